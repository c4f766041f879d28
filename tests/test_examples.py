"""Concepts by example: parsing, the scanner's bad input, the run folder's record, and a concept the teacher and
the exported student learn from a few pictures (a synthetic pattern EfficientNet-Lite0 has no class for)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distiller.cli import main
from distiller.concepts import parse_concepts
from runtime import Classifier
from runtime.errors import UserError


def stripes(seed: int, size: int = 96) -> Image.Image:
    """Red and green stripes at a random angle and phase: one visual concept, many images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(5, 8), rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase) > 0
    img = np.where(wave[..., None], [220, 30, 30], [30, 200, 40]) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _make(out, name, classes, *extra):
    sets = ["teacher.input_size=64", "teacher.judge=none", "synthesis.images_per_class=4", "synthesis.shard_size=4",
            "synthesis.steps=2", "synthesis.crops=1", "distill.epochs=0", "student.input_size=64",
            'export.variants=["onnx-fp32"]', "export.latency_runs=2", "calibration.holdout=4", "calibration.batch=4",
            "calibration.steps=1", "export.calibration_images=4"]
    return ["make", "--classes", classes, "--teacher", "efficientnet-lite0", "--offline", "--device", "cpu", "--out",
            str(out), "--name", name, "--quiet", *[a for s in sets for a in ("--set", s)], *extra]


def test_the_syntax_names_a_concept_by_its_examples_with_or_without_words():
    c = parse_concepts("bird, person=@photos/person/ ,giraffe=a giraffe@ex/g")
    assert [(x.label, x.text, x.examples) for x in c] == [("bird", "bird", ()), ("person", "", ("photos/person/",)),
                                                           ("giraffe", "a giraffe", ("ex/g",))]
    with pytest.raises(UserError, match="label=@FOLDER"):
        parse_concepts("bird,person=@")


def test_bad_example_folders_exit_2_and_write_nothing(tmp_path, capsys):
    empty, big = tmp_path / "empty", tmp_path / "big"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(_make(tmp_path / "runs", "a", f"bird,person=@{empty}")) == 2
    assert "person=@" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(_make(tmp_path / "runs", "a", f"bird,person=@{tmp_path / 'missing'}")) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    big.mkdir()
    for i in range(101):
        stripes(i, 24).save(big / f"{i}.png")
    assert main(_make(tmp_path / "runs", "a", f"bird,person=@{big}")) == 2
    assert "at most 100" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_concept_by_example_is_learnt_by_the_teacher_and_the_exported_student(tmp_path, capsys):
    examples, held = tmp_path / "stripes", tmp_path / "held"
    examples.mkdir()
    held.mkdir()
    for i in range(6):
        stripes(i).save(examples / f"{i}.png")
    (examples / "broken.jpg").write_bytes(b"not a jpeg")
    for i in range(100, 108):
        stripes(i).save(held / f"{i}.png")
    assert main(_make(tmp_path, "run", f"dogs,stripes=@{examples}")) == 0
    run = tmp_path / "run"
    summary = capsys.readouterr().out
    assert "stripes examples (6 images)" in summary
    # the run folder keeps the examples (copies, hashes, where they came from, what was skipped and why)
    record = json.loads((run / "examples.json").read_text())["stripes"]
    assert len(record["files"]) == 6 and record["skipped"][0]["path"].endswith("broken.jpg")
    assert all((run / p).is_file() for p in record["stored"])
    report = json.loads((run / "report.json").read_text())
    assert report["student"]["head"]["stripes"]["source"] == "examples"
    assert report["student"]["head"]["stripes"]["examples"] == 6
    page = (run / "report.html").read_text()
    assert "stripes: defined by 6 example images" in page and 'alt="example images of stripes"' in page
    # the teacher scores the concept by its new row: held-out stripes are stripes, not dogs
    import torch

    from distiller.runfolder import Run
    teacher = Run(run, device="cpu", offline=True).teacher()
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in sorted(held.iterdir())]))
    with torch.no_grad():
        z = teacher.logits(x.permute(0, 3, 1, 2).float() / 255)
    assert (z[:, :2].argmax(1) == 1).float().mean() >= 0.75
    # so does the exported student (closed-set), and the eval warns when scored images are the examples
    clf = Classifier.load(run)
    answers = [clf.classify(p, top_k=1, open_set=False)[0][0] for p in sorted(held.iterdir())]
    assert answers.count("stripes") >= 6, answers
    data = tmp_path / "data"
    (data / "stripes").mkdir(parents=True)
    for p in sorted(examples.glob("*.png"))[:2]:
        (data / "stripes" / p.name).write_bytes(p.read_bytes())
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--no-teacher", "--no-baseline"]) == 0
    assert "example images" in capsys.readouterr().err
