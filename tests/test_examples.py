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


def _clip_teacher(tiny_clip, classes: str, openset: bool = True, text_embeddings=None):
    import dataclasses

    from distiller.examples import scan_examples, scanned_concepts
    from distiller.recipe import load_recipe
    from distiller.teachers import build_teacher
    cfg, weights = tiny_clip
    teacher_cfg = dataclasses.replace(load_recipe("smoke").teacher, model=str(cfg), pretrained=str(weights))
    concepts = parse_concepts(classes)
    concepts = scanned_concepts(concepts, scan_examples(concepts))
    return build_teacher(teacher_cfg, concepts, openset=openset, text_embeddings=text_embeddings), concepts


def test_a_clip_teacher_learns_a_concept_by_example_and_synthesis_aims_at_its_images(tiny_clip, tmp_path):
    import torch
    import torch.nn.functional as F

    from distiller.examples import generic_images
    from distiller.preflight import preflight
    from distiller.prompts import build_prompt_source
    from distiller.recipe import load_recipe
    examples = tmp_path / "stripes"
    examples.mkdir()
    for i in range(6):
        stripes(i).save(examples / f"{i}.png")
    teacher, concepts = _clip_teacher(tiny_clip, f"cat,dog,stripes=@{examples}")
    cfg, weights = tiny_clip
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights)})
    preflight(rec, concepts)   # a CLIP teacher takes concepts by example (it refused them before)
    held = torch.from_numpy(np.stack([np.asarray(stripes(i)) for i in range(100, 108)])).permute(0, 3, 1, 2) / 255
    with torch.no_grad():
        on_held = teacher.logits(held.float()).argmax(1)
        on_generic = teacher.logits(generic_images(16, 96, seed=5)).argmax(1)
    assert (on_held == 2).float().mean() >= 0.875, on_held
    # the row is calibrated: an uncalibrated prototype (image-image cosines beside image-text ones) claims every image
    assert (on_generic == 2).float().mean() <= 0.6, on_generic
    # synthesis aims at the examples' prototype in image space, for every style; the named concepts keep their text
    proto = teacher.examples.protos[0]
    assert torch.allclose(teacher.text[2], proto, atol=1e-6)
    styled = build_prompt_source(teacher, load_recipe("smoke", {"prompts.source": "mix", "prompts.styles": 3}).prompts)
    table = styled.encode_pairs(styled.pseudo)
    assert torch.allclose(table[:, 2], proto.expand(3, -1), atol=1e-6)
    assert not torch.allclose(table[0, 0], table[1, 0])   # a named concept's targets still differ by style
    # resuming from the run folder's cached class targets gives the same teacher
    again, _ = _clip_teacher(tiny_clip, f"cat,dog,stripes=@{examples}", text_embeddings=teacher.text)
    with torch.no_grad():
        assert torch.allclose(again.logits(held.float()), teacher.logits(held.float()), atol=1e-4)
    # a name and examples: the target mixes both, and the logit pools the text's with the row's
    named, _ = _clip_teacher(tiny_clip, f"cat,stripes=striped cloth@{examples}", openset=False)
    text_only, _ = _clip_teacher(tiny_clip, "cat,striped cloth", openset=False)
    assert torch.allclose(named.text[1], F.normalize(text_only.text[1] + named.examples.protos[0], dim=-1), atol=1e-5)
    with torch.no_grad():
        z, z_text = named.logits(held.float()), text_only.logits(held.float())
    assert (z[:, 1] >= z_text[:, 1]).all() and torch.allclose(z[:, 0], z_text[:, 0])
