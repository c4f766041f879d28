"""`distiller eval` on an ImageFolder tree and `distiller predict`, scored against the runtime directly."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distiller.bank import Bank
from distiller.cli import main
from distiller.evaluation import load_image_folder, score, wilson
from runtime import Classifier, UserError


@pytest.fixture(scope="module")
def folder(smoke_run, tmp_path_factory):
    """Val bank images as DIR/<domain>/<folder>/*.png, with folder names that need a labels map."""
    root = tmp_path_factory.mktemp("data")
    imgs, _, recs = Bank(smoke_run / "bank").load("val")
    names = {"photo": {"cat": "cats", "dog": "hund"}, "art": {"cat": "cat", "dog": "dogs"}}
    for i, (im, r) in enumerate(zip(imgs, recs)):
        dom = "photo" if (i // 2) % 2 else "art"
        d = root / dom / names[dom][r["label"]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    (root / "art" / "elephant").mkdir()
    Image.fromarray(imgs[0]).save(root / "art" / "elephant" / "x.png")
    (root / "photo" / "cats" / "broken.png").write_bytes(b"nope")
    lm = root.parent / f"{root.name}_map.txt"
    lm.write_text("hund=dog\n")
    return root, lm


def test_loader_layout_maps_and_skips(folder):
    root, lm = folder
    ds = load_image_folder(root, ["cat", "dog"], {"hund": "dog"})
    assert ds.domains == ["art", "photo"]
    assert ds.skipped_folders == ["art/elephant"]
    assert len(ds.samples) == 25  # 24 val images + one unreadable file
    with pytest.raises(UserError, match="labels map"):
        load_image_folder(root, ["cat", "dog"], {"hund": "wolf"})
    with pytest.raises(UserError, match="match no label"):
        load_image_folder(root, ["car", "bus"])


def test_eval_matches_the_runtime(smoke_run, folder, capsys):
    root, lm = folder
    assert main(["eval", str(smoke_run / "student.onnx"), "--data", str(root), "--labels-map", str(lm), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][str(smoke_run / "student.onnx")]
    assert len(res["unreadable"]) == 1 and res["skipped_folders"] == ["art/elephant"]
    clf = Classifier.load(smoke_run / "student.onnx")
    ds = load_image_folder(root, clf.labels, {"hund": "dog"})
    ok = [s for s in ds.samples if s.path.name != "broken.png"]
    names = clf.labels + [clf.other_label]          # an "other" answer is wrong for a known class
    pred = np.array([names.index(clf.classify(s.path, top_k=1)[0][0]) for s in ok])
    truth = np.array([s.label for s in ok])
    rows = {r["domain"]: r for r in res["rows"]}
    assert rows["all"]["n"] == 24
    assert rows["all"]["accuracy"] == pytest.approx(float((pred == truth).mean()))
    for dom in ("art", "photo"):
        m = np.array([s.domain == dom for s in ok])
        assert rows[dom]["n"] == int(m.sum())
        assert rows[dom]["accuracy"] == pytest.approx(float((pred[m] == truth[m]).mean()))


def test_eval_run_folder_scores_variants_and_teacher(smoke_run, folder, capsys):
    root, lm = folder
    assert main(["eval", str(smoke_run), "--data", str(root), "--labels-map", str(lm), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    baseline = "free baseline (efficientnet-lite0 head @ 128px)"
    assert set(results) == {"student.onnx", "student.int8.onnx", "openvino/student.xml", "openvino/student.int8.xml", "teacher",
                            baseline}
    # the free baseline row is lite0's concept head, scored through the same loader
    from distiller.concepts import load_concepts
    from distiller.evaluation import baseline_predictor, evaluate
    ds = load_image_folder(root, ["cat", "dog"], {"hund": "dog"})
    free = baseline_predictor(load_concepts(smoke_run / "concepts.json"), openset=True)   # the run is open-set
    assert results[baseline]["rows"] == json.loads(json.dumps(evaluate(free, ds)["rows"]))
    # the folder holds the val bank images losslessly (PNG at the teacher's own size, so its eval transform is
    # the identity): the teacher must reproduce its own bank labels exactly. With no near-tie in the bank
    # logits, its accuracy is exactly that of the bank argmax against the intended classes.
    teacher_all = {r["domain"]: r for r in results["teacher"]["rows"]}["all"]
    imgs, logits, recs = Bank(smoke_run / "bank").load("val")
    truth = np.array([r["class"] for r in recs])
    assert np.abs(logits[:, 0] - logits[:, 1]).min() > 1e-3
    assert teacher_all["n"] == len(truth)
    assert teacher_all["accuracy"] == float((logits.argmax(1) == truth).mean())


def test_wilson_and_balanced_accuracy():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    rows = score(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0 + 1]), ["a"] * 4)
    assert rows[0]["accuracy"] == 1.0 and rows[0]["balanced_accuracy"] == 1.0
    rows = score(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]), ["a"] * 4)
    assert rows[0]["accuracy"] == 0.75 and rows[0]["balanced_accuracy"] == 0.5


def test_predict_json_and_corrupt_files(smoke_run, folder, capsys):
    root, _ = folder
    assert main(["predict", str(smoke_run), str(root / "photo"), "--json", "--top-k", "2"]) == 0
    cap = capsys.readouterr()
    lines = [json.loads(x) for x in cap.out.splitlines()]
    assert len(lines) == 12 and all(len(x["top"]) == 2 for x in lines)
    assert all(sum(t["probability"] for t in x["top"]) <= 1 + 1e-4 for x in lines)     # of cat, dog, other
    # the smoke model (a CLIP teacher) carries its other output with the rule off: answers are the classes unless
    # asked (--open-set), then the ranking covers cat, dog and other
    assert main(["predict", str(smoke_run), str(root / "photo"), "--json", "--top-k", "3"]) == 0
    closed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all({t["label"] for t in x["top"]} == {"cat", "dog"} for x in closed)
    assert main(["predict", str(smoke_run), str(root / "photo"), "--json", "--top-k", "3", "--open-set"]) == 0
    full = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(abs(sum(t["probability"] for t in x["top"]) - 1) < 1e-4 for x in full)
    assert all({t["label"] for t in x["top"]} == {"cat", "dog", "other"} for x in full)
    assert "broken.png" in cap.err
    assert main(["predict", str(smoke_run), str(root / "nothing*.png")]) == 2
