"""Students: the targets' scratch and pretrained students, and the ImageNet concept head, which makes a
pretrained student start out as the free baseline (lite0's own head restricted to the concepts)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distiller.cli import main
from distiller.concepts import parse_concepts
from distiller.recipe import load_recipe
from distiller.students import create_student, student_spec
from runtime.errors import UserError


def test_imagenet_head_student_is_the_free_baseline_and_exports(tmp_path):
    from distiller.torchfiles import save_torch
    from distiller.distill import load_student
    from distiller.evaluation import FREE_BASELINE
    import dataclasses

    from distiller.recipe import default_recipe
    from distiller.teachers import build_teacher
    from exporter.onnx_export import export_onnx
    from runtime import Classifier
    from runtime.metadata import ModelMetadata
    concepts = parse_concepts("cats,dogs")
    spec = student_spec(load_recipe("cpu-imagenet", {"openset": True}), concepts)
    assert (spec.model, spec.preprocess.size) == ("tf_efficientnet_lite0", 128)
    assert [len(g) for g in spec.groups] == [7, 118, 875]     # cats, dogs, and "other": every other ImageNet row
    student = create_student(spec, "pretrained").eval()
    baseline = build_teacher(dataclasses.replace(default_recipe().teacher, model=FREE_BASELINE[0], input_size=FREE_BASELINE[1]),
                             concepts, openset=True)
    x = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student((x - 0.5) / 0.5)
        torch.testing.assert_close(ours, baseline.logits(x), atol=1e-4, rtol=1e-4)
    # a checkpoint round trip rebuilds the same structure without any weights download
    save_torch({"model": student.state_dict()}, tmp_path / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_student(spec, tmp_path / "best.pt")((x - 0.5) / 0.5), ours)
    meta = ModelMetadata(labels=("cats", "dogs"), preprocess=spec.preprocess, student=spec.model, other_label="other")
    export_onnx(student, 128, tmp_path / "s.onnx", meta)
    from exporter.quantize import onnx_to_openvino
    onnx_to_openvino(tmp_path / "s.onnx", tmp_path / "s.xml", meta)
    for path, backend in ((tmp_path / "s.onnx", "onnxruntime"), (tmp_path / "s.xml", "openvino")):
        clf = Classifier.load(path, backend=backend)
        np.testing.assert_allclose(clf.logits(((x - 0.5) / 0.5).numpy()), ours.numpy(), atol=1e-3, rtol=1e-3)


def test_student_head_choices():
    rec = load_recipe("cpu-imagenet")
    cats = parse_concepts("cats,dogs")
    odd = parse_concepts("glorbs,dogs")
    fresh = student_spec(rec.replace({"student.head": "fresh"}), cats)
    assert fresh.groups == ((), (), ()) and fresh.fresh_outputs == (0, 1, 2) and not fresh.pooled   # "other" learnt too
    mixed = student_spec(rec, odd)                          # auto: per concept; glorbs is outside ImageNet
    assert mixed.groups[0] == () and len(mixed.groups[1]) == 118 and mixed.fresh_outputs == (0,)
    assert len(mixed.groups[2]) == 1000 - 118               # "other": every ImageNet row no concept owns
    assert student_spec(rec, cats).pooled and student_spec(rec, cats).fresh_outputs == ()
    with pytest.raises(UserError, match="glorbs"):
        student_spec(rec.replace({"student.head": "imagenet"}), odd)
    with pytest.raises(UserError, match="needs student.init = pretrained"):
        student_spec(rec.replace({"student.init": "scratch", "student.head": "imagenet"}), cats)
    with pytest.raises(UserError, match="student.head = 'linear': use auto, fresh or imagenet"):
        student_spec(rec.replace({"student.head": "linear"}), cats)
    scratch = student_spec(rec.replace({"student.init": "scratch"}), cats)
    assert (scratch.model, scratch.preprocess.size, scratch.groups) == ("mobilenetv3_small_100", 128, ())
    assert create_student(scratch).get_classifier().out_features == 3     # two concepts and "other" (the default)
    assert scratch.fresh_outputs == (0, 1, 2)
    assert load_recipe("cpu").student.init == "pretrained" and load_recipe("smoke").student.init == "scratch"


def test_auto_recipe_follows_the_teacher_family():
    from distiller.teachers import auto_recipe
    assert auto_recipe(None) == "cpu" and auto_recipe("ViT-B-32") == "cpu"
    assert auto_recipe("efficientnet-lite2") == "cpu-imagenet" and auto_recipe("timm:resnet50") == "cpu-imagenet"
    assert load_recipe("cpu-imagenet").teacher.model == "efficientnet-lite2"


@pytest.mark.parametrize("args, recipe", [(["--teacher", "efficientnet-lite2"], "cpu-imagenet"),
                                          (["--set", "teacher.model=efficientnet-lite2"], "cpu-imagenet"),
                                          (["--teacher", "efficientnet-lite2", "--set", "teacher.model=ViT-B-32"], "cpu"),
                                          ([], "cpu")])
def test_make_recipe_auto_sees_the_teacher_however_it_is_named(args, recipe, tmp_path, monkeypatch):
    import distiller.pipeline as pipeline
    seen = {}

    class Stop(Exception):
        pass

    def fake_make(run_dir, rec, concepts, reporter, **kw):
        seen["recipe"], seen["teacher"] = rec.name, rec.teacher.model
        raise Stop

    monkeypatch.setattr(pipeline, "make", fake_make)
    monkeypatch.setattr(pipeline, "preflight", lambda *a, **k: None)
    with pytest.raises(Stop):
        main(["make", "--classes", "cats,dogs", "--out", str(tmp_path), "-q", *args])
    assert seen["recipe"] == recipe


def test_readme_example_runs_offline_with_the_imagenet_recipe(tmp_path, capsys):
    """`distiller make --classes cats,dogs --teacher efficientnet-lite2 --target cpu`, tiny budgets. With a
    zero learning rate the shipped model must be exactly the free baseline, through export and runtime."""
    from distiller.concepts import load_concepts
    from distiller.evaluation import baseline_predictor
    from runtime import Classifier
    sets = ["teacher.input_size=64", "synthesis.resolution=64", "synthesis.images_per_class=8", "synthesis.shard_size=4",
            "synthesis.steps=2", "synthesis.crops=1", "distill.epochs=1", "distill.lr=0.0", 'export.variants=["onnx-fp32"]',
            "export.latency_runs=3"]
    args = ["make", "--classes", "cats,dogs", "--teacher", "efficientnet-lite2", "--target", "cpu", "--offline",
            "--device", "cpu", "--out", str(tmp_path), "--name", "readme", "--quiet"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    run = tmp_path / "readme"
    report = json.loads((run / "report.json").read_text())
    assert report["recipe"] == "cpu-imagenet" and report["teacher"]["model"] == "efficientnet-lite2"
    assert (report["student"]["model"], report["student"]["input_size"]) == ("tf_efficientnet_lite0", 128)
    assert report["judge"]["judge"] == "efficientnet-lite0"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)).save(paths[-1])
    clf = Classifier.load(run, exact=True)
    ours = np.stack([clf.logits(clf.preprocess([p]))[0] for p in paths])
    ref = baseline_predictor(load_concepts(run / "concepts.json"), openset=True)(paths)   # open-set by default
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)
    # epoch 0 (the student as initialised) is scored and kept: epochs = 0 ships the free baseline as is
    import dataclasses

    from distiller.bank import Bank
    from distiller.distill import load_student, train_student, transfer_set
    from distiller.runfolder import Run
    r = Run(run)
    spec = student_spec(r.recipe, r.concepts)
    cfg = dataclasses.replace(r.recipe.distill, epochs=0)
    history = train_student(create_student(spec, "pretrained"), spec, transfer_set(Bank(run / "bank"), None, cfg),
                            cfg, tmp_path / "ck", seed=0)
    assert [h["epoch"] for h in history] == [0] and history[0]["loss"] is None
    assert torch.load(tmp_path / "ck/best.pt", weights_only=True)["epoch"] == 0
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(load_student(spec, tmp_path / "ck/best.pt")(x), create_student(spec, "pretrained").eval()(x))
