"""The smoke `make` run end to end: artifacts, parity of every format, metadata, agreement, INT8."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import python_env
from distiller.bank import Bank
from distiller.distill import load_student
from distiller.runfolder import Run
from distiller.students import student_spec
from runtime import Classifier, ModelMetadata
from runtime.preprocess import preprocess

ARTIFACTS = ["recipe.toml", "concepts.json", "text_embeddings.pt", "styles.pt", "bank/plan.json", "bank/manifest.jsonl",
             "checkpoints/best.pt", "checkpoints/last.pt", "student.onnx", "student.int8.onnx",
             "openvino/student.xml", "openvino/student.bin", "openvino/student.json",
             "openvino/student.int8.xml", "openvino/student.int8.bin", "samples.png", "report.json"]


def test_every_artifact_exists(smoke_run, report):
    missing = [a for a in ARTIFACTS if not (smoke_run / a).is_file()]
    assert not missing
    assert (smoke_run / report["deployable"]).is_file()
    assert not list(smoke_run.rglob(".*.tmp")), "temporary files left behind"
    bank = Bank(smoke_run / "bank")
    plan = bank.plan()
    # 96 images of the concepts + 17 negatives (synthesis.negative_share 0.15 of the bank, for the generic
    # "other" prompts: the run is open-set), planned by index after the concepts' images
    assert bank.is_complete() and plan.num_shards == 10 and plan.total == 113 and plan.negatives == 17
    manifest = [json.loads(x) for x in (smoke_run / "bank/manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 113 and {r["split"] for r in manifest} == {"train", "val"}
    assert all(len(r["logits"]) == 3 for r in manifest)          # cat, dog, other
    neg = [r for r in manifest if r["source"] == "negative"]
    assert len(neg) == 17 and [r["index"] for r in neg] == list(range(96, 113))
    assert all(r["class"] is None and r["label"] is None for r in neg)
    assert {r["style_name"] for r in neg} == {f"other: prompt {i}" for i in range(8)}
    assert sum(r["source"] == "surrogate" for r in manifest) == 96


@pytest.fixture(scope="module")
def student_and_val(smoke_run):
    run = Run(smoke_run)
    spec = student_spec(run.recipe, run.concepts)
    model = load_student(spec, smoke_run / "checkpoints/best.pt")
    va_img, va_logit, _ = Bank(smoke_run / "bank").load("val")
    batch = np.stack([preprocess(im, spec.preprocess) for im in va_img])
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    return model, spec, batch, ref, va_logit


@pytest.mark.parametrize("file", ["student.onnx", "openvino/student.xml"])
def test_fp32_exports_match_pytorch(smoke_run, student_and_val, file):
    _, _, batch, ref, _ = student_and_val
    out = Classifier.load(smoke_run / file).logits(batch)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-3)


def test_metadata_round_trips(smoke_run, student_and_val):
    _, spec, _, _, _ = student_and_val
    metas = {f: Classifier.load(smoke_run / f).metadata for f in
             ["student.onnx", "student.int8.onnx", "openvino/student.xml", "openvino/student.int8.xml"]}
    for f, m in metas.items():
        assert m.labels == ("cat", "dog")
        assert m.preprocess == spec.preprocess
        assert m.student == "resnet10t" and m.recipe["name"] == "smoke"
        assert m.teacher["model"] == "tiny" and m.teacher["weights"].endswith("tiny.pt") and m.teacher["family"] == "open_clip"
        assert m.precision == ("int8" if "int8" in f else "fp32")
        assert ModelMetadata.from_json(m.to_json()) == m
    # OpenVINO keeps the same JSON in rt_info as in the sidecar
    import openvino as ov
    xml = smoke_run / "openvino/student.xml"
    rt = ov.Core().read_model(str(xml)).get_rt_info(["distiller"]).astype(str)
    assert ModelMetadata.from_json(rt) == ModelMetadata.from_json(xml.with_suffix(".json").read_text())


def test_student_learned_the_teacher(report, student_and_val):
    _, _, _, ref, teacher = student_and_val
    pred = ref.argmax(1)
    agree = float((pred == teacher.argmax(1)).mean())
    assert agree > 0.6, f"student-teacher agreement on val {agree} is not above chance"
    assert len(set(pred.tolist())) >= 2, "a constant student must fail"
    assert report["student"]["best_val_agreement"] == pytest.approx(agree, abs=0.05)


def test_int8_close_to_fp32(smoke_run, report):
    for name in ("onnx-int8", "openvino-int8"):
        row = report["export"]["variants"][name]
        assert row["cosine"] >= 0.99, (name, row)
        assert row["agreement"] >= 0.9, (name, row)
    assert report["deployable"] in {r["file"] for r in report["export"]["variants"].values()}
    # fidelity is checked on every bank image the quantizers did not calibrate on (113, negatives included,
    # less the 16 calibration images), teacher agreement on the val shards only
    assert (report["export"]["fidelity_images"], report["export"]["calibration_images"]) == (97, 16)
    # a scratch student's BatchNorm statistics are the bank's: it calibrates on the bank, judged there as before
    assert (report["export"]["calibration_source"], report["export"]["judged_on"]) == ("bank", "bank")
    assert report["export"]["fidelity_sources"] == {"bank": 97} and not (smoke_run / "calibration").exists()
    fp32 = report["export"]["variants"]["onnx-fp32"]
    assert fp32["teacher_agreement"] * 24 == pytest.approx(round(fp32["teacher_agreement"] * 24))


def test_runtime_classifies_without_torch(smoke_run, tmp_path):
    from PIL import Image
    img = Bank(smoke_run / "bank").load("val")[0][0]
    Image.fromarray(img).save(tmp_path / "x.png")
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'timm', 'open_clip', 'distiller', 'exporter', 'onnx'):\n"
        "    sys.modules[m] = None\n"
        "from runtime import Classifier\n"
        f"clf = Classifier.load({str(smoke_run)!r})\n"
        f"res = clf.classify({str(tmp_path / 'x.png')!r}, top_k=3, open_set=True)\n"
        "assert [l for l, _ in res] and abs(sum(p for _, p in res) - 1) < 1e-5, res\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "print(res)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cat" in r.stdout and "dog" in r.stdout and "other" in r.stdout


def test_rerun_of_finished_run_is_refused_and_exist_ok_redoes_it(smoke_run, tiny_clip, tmp_path, capsys):
    import shutil

    from conftest import smoke_args
    from distiller.cli import main
    before = (smoke_run / "report.json").read_bytes()
    assert main(smoke_args(tiny_clip, smoke_run.parent, smoke_run.name)) == 2
    err = capsys.readouterr().err
    assert "already exists and is finished" in err and "--exist-ok" in err
    assert (smoke_run / "report.json").read_bytes() == before
    # --exist-ok on a copy (the session's smoke run stays as it is): the run is made again from scratch
    copy = tmp_path / "runs" / "again"
    shutil.copytree(smoke_run, copy)
    (copy / "stale.txt").write_text("from the old run")
    old = json.loads((copy / "report.json").read_text())
    fast = ["--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]']   # the same bank; a quicker student
    assert main(smoke_args(tiny_clip, copy.parent, copy.name, "--exist-ok", *fast)) == 0
    new = json.loads((copy / "report.json").read_text())
    assert not (copy / "stale.txt").exists(), "the old run folder must be replaced, not patched"
    assert new["labels"] == old["labels"] and (copy / new["deployable"]).is_file()
    assert _digest(copy / "bank") == _digest(smoke_run / "bank")   # seeded: the same bank again


def _digest(folder):
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.npy"))}
