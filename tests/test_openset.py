"""Open-set models: an ``other`` output for images of none of the concepts, and a calibrated threshold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distiller.cli import main
from distiller.concepts import parse_concepts
from runtime import Classifier
from runtime.errors import UserError
from runtime.metadata import ModelMetadata, Preprocess
from runtime.openset import OpenSetRule, conformal_threshold, softmax


@pytest.fixture(scope="module")
def lite0():
    import dataclasses

    from distiller.recipe import default_recipe
    from distiller.teachers import build_teacher
    concepts = parse_concepts("car,truck,dog")      # car and truck overlap (minivan, ...): left out of both
    return concepts, build_teacher(dataclasses.replace(default_recipe().teacher, model="efficientnet-lite0", input_size=64), concepts,
                                   openset=True)


def test_imagenet_teachers_other_logit_is_the_logsumexp_of_every_non_member(lite0):
    from distiller.imagenet_concepts import map_concepts
    concepts, t = lite0
    coverage = map_concepts(concepts)
    overlaps = {i for c in coverage for i in c.overlaps}
    assert overlaps, "the fixture needs concepts that overlap"
    owned = {i for c in coverage for i in c.classes}
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, out = t.imagenet_logits(x), t.logits(x)
    assert out.shape == (3, 4) and t.outputs == 4 and t.num_classes == 3
    others = [i for i in range(1000) if i not in owned]
    assert overlaps <= set(others) and len(others) == 1000 - len(owned)
    torch.testing.assert_close(out[:, 3], torch.logsumexp(full[:, others], 1))
    for k, c in enumerate(coverage):
        torch.testing.assert_close(out[:, k], torch.logsumexp(full[:, list(c.classes)], 1))


def test_pretrained_students_k_plus_1_head_is_its_own_pooled_rows(lite0):
    from distiller.recipe import load_recipe
    from distiller.students import create_student, student_spec
    from distiller.teachers.imagenet import lite_model
    concepts, t = lite0
    rec = load_recipe("cpu-imagenet", {"student.input_size": 64, "openset": True})
    spec = student_spec(rec, concepts)
    assert spec.num_classes == 4 and len(spec.groups) == 4
    student = create_student(spec, "pretrained").eval()
    ref = lite_model("efficientnet-lite0").eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, out = ref(x), student(x)
    for k, g in enumerate(spec.groups):
        torch.testing.assert_close(out[:, k], torch.logsumexp(full[:, list(g)], 1), atol=1e-4, rtol=1e-4)
    closed = student_spec(load_recipe("cpu-imagenet", {"openset": False}), concepts)
    assert closed.num_classes == 3 and len(closed.groups) == 3


def _classifier(logits: np.ndarray, threshold: float, other: str = "other", bias: float = 0.0,
                score: str = "probability", on: bool = True) -> Classifier:
    meta = ModelMetadata(labels=("cat", "dog"), preprocess=Preprocess(size=8, resize=8), other_label=other,
                         open_set=OpenSetRule(score, threshold, on), other_bias=bias)
    return Classifier(lambda batch: logits[: len(batch)], meta, Path("m.onnx"), "onnxruntime")


LOGITS = np.array([[3.0, 0.0, 0.0],      # cat, confidently
                   [0.2, 0.0, 0.1],      # cat, barely (p = 0.37)
                   [0.0, 0.0, 4.0]], np.float32)   # other wins


def _tops(clf, open_set=True):
    return [clf._ranked(row, 3, open_set)[0][0] for row in LOGITS]


def test_the_threshold_is_monotone_and_other_comes_from_the_metadata():
    assert _tops(_classifier(LOGITS, 0.0)) == ["cat", "cat", "other"]      # 0: the other output alone decides
    assert _tops(_classifier(LOGITS, 0.5)) == ["cat", "other", "other"]
    assert _tops(_classifier(LOGITS, 1.0)) == ["other", "other", "other"]  # 1: everything is other
    assert _tops(_classifier(LOGITS, 1.0, other="none of these")) == ["none of these"] * 3
    ranked = _classifier(LOGITS, 0.5)._ranked(LOGITS[1], 3)
    assert [n for n, _ in ranked] == ["other", "cat", "dog"] and abs(sum(p for _, p in ranked) - 1) < 1e-6


def test_other_bias_moves_the_other_output_alone():
    assert _tops(_classifier(LOGITS, 0.0, bias=4.5)) == ["cat", "cat", "cat"]       # 4 - 4.5 < 0: cat by a tie-break
    assert _tops(_classifier(LOGITS, 0.0, bias=-1.0)) == ["cat", "other", "other"]  # 0.1 + 1 > 0.2
    clf = _classifier(LOGITS, 0.5, bias=2.0)
    shifted = LOGITS - np.array([0.0, 0.0, 2.0], np.float32)
    p = softmax(shifted)
    legacy = np.where((p.argmax(1) == 2) | (p.max(1) < 0.5), 2, p.argmax(1))   # schema 2-3: other wins, or p < t
    np.testing.assert_array_equal(clf.decide(LOGITS), legacy)
    ranked = dict(clf._ranked(LOGITS[2], 3))
    assert ranked["other"] == pytest.approx(float(softmax(shifted[2])[2]))
    np.testing.assert_array_equal(LOGITS[2], [0.0, 0.0, 4.0])                        # the outputs are not touched
    assert clf.decide(LOGITS, open_set=False).tolist() == [0, 0, 0]
    with pytest.raises(UserError, match="other_bias"):
        ModelMetadata(labels=("cat", "dog"), preprocess=Preprocess(size=8, resize=8), other_label="o", other_bias=float("nan"))


def test_open_set_false_restores_the_closed_set_ranking():
    clf = _classifier(LOGITS, 1.0)
    for row in LOGITS:
        ranked = clf._ranked(row, 3, open_set=False)
        assert [n for n, _ in ranked] == [["cat", "dog"][i] for i in np.argsort(-row[:2], kind="stable")]
        p = np.exp(row[:2] - row[:2].max())
        assert ranked[0][1] == pytest.approx(float(p.max() / p.sum()))
    img = np.zeros((8, 8, 3), np.uint8)
    assert [n for n, _ in clf.classify(img, open_set=False)] == ["cat", "dog"]
    assert clf.classify(img)[0][0] == "other"


def test_an_old_metadata_version_loads_as_closed_set():
    old = json.dumps({"labels": ["cat", "dog"], "preprocess": {"size": 8, "resize": 8}, "schema_version": 1})
    meta = ModelMetadata.from_json(old)
    assert meta.other_label == "" and meta.outputs == 2
    clf = Classifier(lambda b: np.array([[0.0, 1.0]] * len(b), np.float32), meta, Path("m.onnx"), "onnxruntime")
    assert [n for n, _ in clf.classify(np.zeros((8, 8, 3), np.uint8))] == ["dog", "cat"]
    v2 = json.dumps({"labels": ["cat", "dog"], "preprocess": {"size": 8, "resize": 8}, "schema_version": 2,
                     "other_label": "other", "threshold": 0.25})
    meta = ModelMetadata.from_json(v2)                       # version 2: open-set, read without a bias
    assert (meta.outputs, meta.open_set, meta.other_bias) == (3, OpenSetRule("probability", 0.25, True), 0.0)
    v3 = json.dumps({"labels": ["cat", "dog"], "preprocess": {"size": 8, "resize": 8}, "schema_version": 3,
                     "other_label": "other", "threshold": 0.5, "threshold_fit": {"source": "bank"}, "other_bias": 2.0})
    old = Classifier(lambda b: LOGITS[: len(b)], ModelMetadata.from_json(v3), Path("m.onnx"), "onnxruntime")
    assert old.rule == OpenSetRule("probability", 0.5, True, {"source": "bank"}) and old.open_set()
    np.testing.assert_array_equal(old.decide(LOGITS), _classifier(LOGITS, 0.5, bias=2.0).decide(LOGITS))
    with pytest.raises(UserError, match="newer than this runtime"):
        ModelMetadata.from_json(v2.replace('"schema_version": 2', '"schema_version": 99'))
    with pytest.raises(UserError, match="also a concept"):
        ModelMetadata(labels=("cat", "other"), preprocess=Preprocess(size=8, resize=8), other_label="other")


def _lite_make(out, name, *extra):
    sets = ["teacher.input_size=64", "synthesis.images_per_class=8", "synthesis.shard_size=4", "synthesis.steps=2",
            "synthesis.crops=1", "distill.epochs=0", "student.input_size=64",
            'export.variants=["onnx-fp32","onnx-int8"]', "export.latency_runs=3", "export.max_drop=100", "openset=true",
            "export.calibration_images=8", "calibration.holdout=8", "calibration.batch=8", "calibration.steps=2"]
    return ["make", "--classes", "dogs,birds", "--teacher", "efficientnet-lite0", "--offline", "--device", "cpu",
            "--out", str(out), "--name", name, "--quiet", *[a for s in sets for a in ("--set", s)], *extra]


def test_every_exported_variant_has_the_other_output_and_predict_prints_it(tmp_path, capsys):
    from distiller.bank import Bank
    assert main(_lite_make(tmp_path, "os", "--other-label", "neither", "--set", "other_bias=2.5")) == 0
    run = tmp_path / "os"
    report = json.loads((run / "report.json").read_text())
    # the default rule is recorded in export.json and carried by every variant: the best concept output under the
    # threshold keeping 95% of the bank's surrogates of the classes (on the variant's own outputs), on by default
    # for an ImageNet teacher
    from runtime.preprocess import preprocess
    rule = OpenSetRule.from_json(report["export"]["open_set"])
    assert (rule.score, rule.on, rule.fit["source"], rule.fit["keep"]) == ("max_logit", True, "bank surrogates", 0.95)
    assert rule.to_json() == report["export"]["variants"][report["export"]["deployable_variant"]]["open_set"]
    bank_imgs, bank_logits, _ = Bank(run / "bank").load()
    surrogates = bank_imgs[bank_logits.argmax(1) < 2]
    for v in report["export"]["variants"].values():
        clf = Classifier.load(run / v["file"])
        assert clf.rule.to_json() == v["open_set"] and clf.rule.fit["images"] == len(surrogates)
        z = clf.scores(clf.logits(np.stack([preprocess(im, clf.metadata.preprocess) for im in surrogates])))
        assert clf.rule.threshold == pytest.approx(conformal_threshold(z[:, :2].max(1), 0.95)[0], abs=1e-5)
    # a pretrained student with frozen BatchNorm calibrates on images made from its own statistics, and its INT8
    # is judged on the held-out ones (cosine) and the bank's validation images
    exp = report["export"]
    assert (exp["calibration_source"], exp["calibration_images"]) == ("statistics", 8)
    assert exp["fidelity_sources"]["statistics"] == 8 and exp["cosine_on"] == "statistics" and exp["judged_on"] is None
    assert set(exp["variants"]["onnx-int8"]["cosine_by_source"]) == set(exp["fidelity_sources"])
    assert len(list((run / "calibration").glob("shard_*"))) == 2
    imgs, logits, _ = Bank(run / "bank").load()
    assert logits.shape[1] == 3                      # the teacher labelled the bank with K + 1 columns
    for file in ("student.onnx", "student.int8.onnx"):
        clf = Classifier.load(run / file, exact=True)
        assert clf.labels == ["dogs", "birds"] and clf.other_label == "neither" and clf.metadata.outputs == 3
        assert clf.logits(clf.preprocess([imgs[0]])).shape == (1, 3)
    # INT8 fidelity counts the K + 1 decisions: a reference whose "other" output wins everywhere agrees
    # with a variant exactly where that variant answers other
    from exporter.variants import FidelitySet, measure
    fp = Classifier.load(run / "student.int8.onnx", exact=True)
    batch = fp.preprocess(list(imgs))
    out = fp.logits(batch)
    ref = out.copy()
    ref[:, 2] = out.max(1) + 10.0
    src = np.array(["bank"] * len(batch))
    m = measure(run / "student.int8.onnx", FidelitySet(batch, ref, np.full_like(ref, np.nan), src), None)
    assert m["agreement"] == pytest.approx(float((out.argmax(1) == 2).mean())) == m["agreement_by_source"]["bank"]
    assert measure(run / "student.int8.onnx", FidelitySet(batch, out, np.full_like(out, np.nan), src), None)["agreement"] == 1.0
    noise = tmp_path / "noise.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(noise)
    capsys.readouterr()
    assert main(["predict", str(run), str(noise), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {t["label"] for t in line["top"]} == {"dogs", "birds", "neither"}
    # other_bias travels in every variant's metadata and predict reads the other output through it
    shipped = Classifier.load(run, exact=True)
    assert shipped.metadata.other_bias == 2.5
    z = shipped.logits(shipped.preprocess([noise]))[0] - np.array([0.0, 0.0, 2.5], np.float32)
    assert {t["label"]: t["probability"] for t in line["top"]}["neither"] == pytest.approx(float(softmax(z)[2]), abs=1e-4)


def test_every_score_thresholds_the_same_outputs_and_off_means_closed_set_unless_asked():
    margin = _classifier(LOGITS, 0.0, score="margin")          # best concept - other: 3, 0.1, -4
    assert _tops(margin) == ["cat", "cat", "other"]
    assert _tops(_classifier(LOGITS, 0.15, score="margin")) == ["cat", "other", "other"]
    assert _tops(_classifier(LOGITS, -5.0, score="margin")) == ["cat", "cat", "cat"]   # never other: the closed answer
    assert _tops(_classifier(LOGITS, 1.0, score="max_logit")) == ["cat", "other", "other"]
    assert _tops(_classifier(LOGITS, 0.6, score="max_softmax")) == ["cat", "other", "other"]  # p = 0.95, 0.55, 0.5
    # a concept answer is never ranked below "other", whatever their probabilities
    ranked = _classifier(LOGITS, -5.0, score="margin")._ranked(LOGITS[2], 3)
    assert [n for n, _ in ranked][:2] == ["cat", "other"] and ranked[1][1] > ranked[0][1]
    off = _classifier(LOGITS, 0.0, score="margin", on=False)   # the rule is carried, not applied unless asked
    assert _tops(off, open_set=None) == ["cat", "cat", "cat"] and _tops(off) == ["cat", "cat", "other"]
    img = np.zeros((8, 8, 3), np.uint8)
    assert [n for n, _ in off.classify(img)] == ["cat", "dog"] and off.classify(img, open_set=True)[0][0] == "cat"
    assert off.decide(LOGITS).tolist() == [0, 0, 0] and off.decide(LOGITS, open_set=True).tolist() == [0, 0, 2]
    with pytest.raises(UserError, match="unknown to this runtime"):
        OpenSetRule("nope")
    with pytest.raises(UserError, match="finite"):
        OpenSetRule("margin", float("nan"))


def test_conformal_threshold_keeps_what_it_promises():
    rng = np.random.default_rng(0)
    t, promised = conformal_threshold(np.arange(100.0), 0.95)   # rank floor(101 * 0.05) = 5: the 5th smallest
    assert (t, promised) == (4.0, True)
    assert conformal_threshold(np.arange(10.0), 0.95) == (0.0, False)   # under 19 images: the minimum, no promise
    kept = []
    for _ in range(200):   # on new draws of the same distribution it keeps >= 95% on average
        t, _ = conformal_threshold(rng.normal(size=40), 0.95)
        kept.append((rng.normal(size=400) >= t).mean())
    assert np.mean(kept) >= 0.95


def test_other_label_must_differ_from_the_classes(tmp_path, capsys):
    assert main(_lite_make(tmp_path, "bad", "--other-label", "dogs")) == 2
    assert "is also one of the classes" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_auroc_and_its_interval():
    from distiller.openset import auroc, auroc_interval, rejection
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5          # ties count half
    lo, hi = auroc_interval(np.array([0.9, 0.7, 0.4]), np.array([0.5, 0.2, 0.1]))
    assert 0 <= lo <= auroc(np.array([0.9, 0.7, 0.4]), np.array([0.5, 0.2, 0.1])) <= hi <= 1
    r = rejection(np.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.5]]), np.array([[0.0, 0.0, 5.0]]), [2], 2,
                  OpenSetRule("margin"))
    assert (r["auroc"], r["other_accuracy"], r["score"]) == (1.0, 1.0, "margin")


def test_eval_other_data_scores_rejection_for_every_model(tmp_path, capsys):
    from PIL import Image

    from distiller.bank import Bank
    assert main(_lite_make(tmp_path, "os")) == 0
    run = tmp_path / "os"
    imgs, _, recs = Bank(run / "bank").load()
    data, other = tmp_path / "data", tmp_path / "other"
    for i, (im, r) in enumerate(zip(imgs, recs)):
        (data / r["label"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(data / r["label"] / f"{i}.png")
    other.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(other / f"noise{i}.png")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--other-data", str(other), "--json", "--no-teacher"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    from distiller.openset import auroc
    for name in ("student.onnx", "student.int8.onnx", "free baseline (efficientnet-lite0 head @ 128px)"):
        r = results[name]["open_set"]
        assert r["other_images"] == 6 and r["known_images"] == 16 and 0 <= r["auroc"] <= 1
        assert r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
    # the student's numbers, recomputed from the runtime
    clf = Classifier.load(run / "student.onnx", exact=True)
    kz = clf.logits(clf.preprocess(sorted(data.rglob("*.png"))))
    oz = clf.logits(clf.preprocess(sorted(other.glob("*.png"))))
    r = results["student.onnx"]["open_set"]
    assert r["auroc"] == pytest.approx(auroc(clf.rule.known_score(kz, 2), clf.rule.known_score(oz, 2)))
    assert r["other_accuracy"] == pytest.approx(float((clf.decide(oz, open_set=True) == 2).mean()))
    assert json.loads((run / "eval.json").read_text())["results"]["student.onnx"]["open_set"]["other_images"] == 6
    assert main(["report", str(run)]) == 0                  # report.html shows the rejection table, every model
    page = (run / "report.html").read_text()
    assert "Known classes against images of other things" in page and f"{r['auroc']:.3f} [" in page
    assert main(["eval", str(run), "--data", str(data), "--other-data", str(tmp_path / "none")]) == 2
    # --fit on too few known images: one error line, exit 2, no model rewritten
    files = sorted(p for p in run.rglob("student*") if p.suffix in (".onnx", ".xml", ".json"))
    before = {p: p.read_bytes() for p in files}
    few = tmp_path / "few"
    for i, p in enumerate(sorted(data.rglob("*.png"))[:6]):
        (few / p.parent.name).mkdir(parents=True, exist_ok=True)
        (few / p.parent.name / f"{i}.png").write_bytes(p.read_bytes())
    eval_before = (run / "eval.json").read_bytes()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(few), "--other-data", str(other), "--fit"]) == 2
    assert "at least 10 labelled images" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files} == before and (run / "eval.json").read_bytes() == eval_before
    # --fit on the 16 known images: every variant gets a threshold (on its own outputs) that keeps >= 75% of them
    assert main(["eval", str(run), "--data", str(data), "--other-data", str(other), "--fit", "--keep", "0.75",
                 "--score", "margin", "--json", "--no-teacher", "--no-baseline"]) == 0
    fits = json.loads(capsys.readouterr().out)["open_set_fit"]
    assert set(fits) == {"student.onnx", "student.int8.onnx"}
    for file, fit in fits.items():
        clf = Classifier.load(run / file, exact=True)
        assert clf.rule.to_json() == fit["rule"] and clf.rule.on and clf.rule.score == "margin"
        assert clf.metadata.schema_version == 4 and fit["rule"]["fit"]["keep"] == 0.75
        kept = (clf.decide(clf.logits(clf.preprocess(sorted(data.rglob("*.png"))))) != 2).mean()
        assert kept >= 0.75 and fit["known_kept"] == pytest.approx(kept)
        assert clf.logits(clf.preprocess([imgs[0]])).tolist() == Classifier.load(run / file).logits(
            clf.preprocess([imgs[0]])).tolist()   # the weights are untouched
    assert json.loads((run / "eval.json").read_text())["open_set_fit"] == fits
    # predict follows the fitted rule; an app's own threshold overrides it
    capsys.readouterr()
    assert main(["predict", str(run / "student.onnx"), str(other / "noise0.png"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out.splitlines()[0])["top"][0]["label"]
    clf = Classifier.load(run / "student.onnx")
    z = clf.scores(clf.logits(clf.preprocess([other / "noise0.png"])))
    assert (top == "other") == bool(z[0, :2].max() - z[0, 2] < clf.rule.threshold)
    never = Classifier.load(run / "student.onnx", other_threshold=-1e9)
    assert never.rule.fit == {"source": "override"} and never.classify(other / "noise0.png")[0][0] != "other"
    assert main(["report", str(run)]) == 0
    assert "fit on 16 labelled images of data, keeping 75% of them" in (run / "report.html").read_text()
