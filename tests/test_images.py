"""--images DIR: the user's unlabelled images, scanned, labelled by the teacher (resumably), distilled on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import python_env, smoke_args
from distiller.cli import main
from runtime.errors import UserError


def photo(seed: int, kind: str = "mix", size=(120, 90)) -> Image.Image:
    """A test-made picture: ``stripes`` (black and white bands at a random angle), ``disks`` (yellow disks
    on green), or ``mix`` (either, by seed), with noise; never a downloaded image."""
    rng = np.random.default_rng(seed)
    if kind == "mix":
        kind = ("stripes", "disks")[seed % 2]
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        band = (np.sin((x * np.cos(a) + y * np.sin(a)) / rng.uniform(3, 6)) > 0).astype(np.float32)
        img = np.repeat(band[..., None], 3, 2) * 230 + 10
    else:
        img = np.zeros((h, w, 3), np.float32) + (40, 120, 40)
        for _ in range(rng.integers(2, 5)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 30)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (240, 220, 40)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def photo_dir(root, n=20, start=0, kind="mix"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        photo(i, kind).save(root / f"img_{i:03d}.{'jpg' if i % 3 else 'png'}")
    return root


def _lite_sets(*extra):
    sets = ["teacher.input_size=64", "synthesis.images_per_class=8", "synthesis.shard_size=4", "synthesis.steps=2",
            "synthesis.crops=1", "distill.epochs=1", 'export.variants=["onnx-fp32"]', "export.latency_runs=3",
            "images.shard_size=8", *extra]
    return [a for s in sets for a in ("--set", s)]


def lite_make(out, name, classes, *extra):
    return ["make", "--classes", classes, "--teacher", "efficientnet-lite0", "--recipe", "smoke", "--offline",
            "--device", "cpu", "--out", str(out), "--name", name, "--quiet", *extra]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """20 usable photos, a corrupt .jpg, a zero-byte .png and a byte-identical copy in a subfolder."""
    d = photo_dir(tmp_path_factory.mktemp("messy") / "pool")
    (d / "broken.jpg").write_bytes((d / "img_001.jpg").read_bytes()[:300])
    (d / "empty.png").write_bytes(b"")
    (d / "sub").mkdir()
    shutil.copy(d / "img_002.jpg", d / "sub" / "copy.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def image_make(messy, tmp_path_factory):
    """(run folder, what make printed on stdout)."""
    import contextlib
    import io
    out, buf = tmp_path_factory.mktemp("runs"), io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(lite_make(out, "dl", "dogs,birds", "--images", str(messy), *_lite_sets("teacher.judge_min=1.01"))) == 0
    return out / "dl", buf.getvalue()


@pytest.fixture(scope="module")
def image_run(image_make):
    return image_make[0]


def test_make_with_images_end_to_end(image_run, messy):
    report = json.loads((image_run / "report.json").read_text())
    ts = report["transfer_set"]
    assert ts["surrogate"] == 16 and ts["real"] == 20 and ts["real_val"] == 4
    skipped = {s["path"]: s["reason"] for s in ts["skipped"]}
    assert set(skipped) == {str(messy / "broken.jpg"), str(messy / "empty.png"), str(messy / "sub" / "copy.jpg")}
    assert skipped[str(messy / "empty.png")] == "empty file (0 bytes)"
    assert skipped[str(messy / "sub" / "copy.jpg")] == f"duplicate of {messy / 'img_002.jpg'}"
    assert skipped[str(messy / "broken.jpg")].startswith("corrupt")
    recs = [json.loads(x) for x in (image_run / "bank" / "manifest.jsonl").read_text().splitlines()]
    real = [r for r in recs if r["source"] == "real"]
    assert len(real) == 20 and len(recs) == 36 and {r["source"] for r in recs} == {"surrogate", "real"}
    assert all(len(r["sha256"]) == 64 and r["path"].startswith(str(messy)) for r in real)
    assert all("class" not in r and "label" not in r for r in real)        # unlabelled: the teacher labels them
    assert sum(r["split"] == "val" for r in real) == 4
    # the student was selected on the real validation images, and INT8 would be calibrated on them
    assert report["student"]["selected_on"] == "real" and "val_agreement_real" in report["student"]
    assert report["export"]["calibration_source"] == "real"
    warnings = json.loads((image_run / "warnings.json").read_text())     # judge_min above 1: the judge always warns,
    assert any("may not transfer" in w for w in warnings) and not any("--images" in w for w in warnings)  # without the hint
    # the user's files are untouched
    assert (messy / "empty.png").stat().st_size == 0 and (messy / "sub" / "copy.jpg").exists()


def test_summary_lists_the_skipped_files(image_make):
    out = " ".join(image_make[1].split())
    assert "real: 20" in out and "skipped: 3" in out
    for name in ("broken.jpg", "empty.png", "copy.jpg"):
        assert name in out
    assert "real " in out and "the number to trust" in out


def test_an_image_free_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    d = tmp_path / "docs"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "readme.txt").write_text("hello")
    (d / "a" / "b" / "data.csv").write_text("1,2")
    (d / "a" / "b" / "fake.jpg").write_bytes(b"not a jpeg at all")
    assert main(lite_make(tmp_path / "out", "x", "dogs,birds", "--images", str(d), *_lite_sets())) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable image (1 skipped, 2 other files)" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(lite_make(tmp_path / "out", "x", "dogs,birds", "--images", str(tmp_path / "missing"))) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_scan_converts_every_mode_and_skips_what_it_cannot_use(tmp_path):
    from distiller.images import scan_images
    d = tmp_path / "modes"
    d.mkdir()
    base = photo(3, "disks")
    base.convert("L").save(d / "gray.png")
    base.convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    base.convert("RGBA").save(d / "rgba.webp")
    base.save(d / "plain.bmp")
    base.save(d / "plain.tiff")
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(d / "deep16.png")
    frames = [photo(i, "stripes") for i in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (15, 200), "red").save(d / "thin.png")
    scan = scan_images([d], seed=0, val_fraction=0.2)
    names = {os.path.basename(f["path"]) for f in scan.files}
    assert names == {"gray.png", "palette.png", "cmyk.jpg", "rgba.webp", "plain.bmp", "plain.tiff", "deep16.png", "anim.gif"}
    assert [(os.path.basename(s["path"]), s["reason"]) for s in scan.skipped] == [
        ("thin.png", "too small (15x200, under 16 px on a side)")]


def test_transparent_pixels_are_flattened_on_white_and_16_bit_scaled(tmp_path):
    from distiller.images import square
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)           # left half opaque red, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    sq = square(str(tmp_path / "a.png"), 40)
    assert tuple(sq[20, 5]) == (255, 0, 0) and tuple(sq[20, 35]) == (255, 255, 255)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(tmp_path / "d.png")
    assert abs(int(square(str(tmp_path / "d.png"), 32)[5, 5, 0]) - round(40000 / 257)) <= 1


def test_an_exif_rotated_jpeg_is_stored_upright(tmp_path):
    from distiller.images import square
    up = np.zeros((60, 60, 3), np.uint8)
    up[:30] = (250, 10, 10)                    # red on top, blue below, as a viewer shows it
    up[30:] = (10, 10, 250)
    stored = np.rot90(up, 1)                   # the sensor's pixels: rotated; EXIF orientation 6 turns them back
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    sq = square(str(tmp_path / "r.jpg"), 60)
    assert sq[5, 30, 0] > 200 and sq[5, 30, 2] < 60        # top: red
    assert sq[55, 30, 2] > 200 and sq[55, 30, 0] < 60      # bottom: blue


def test_folder_names_never_become_labels_and_the_split_is_fixed_by_seed(tmp_path):
    from distiller.images import scan_images
    a, b = tmp_path / "a", tmp_path / "b"
    photo_dir(a / "dogs", 10)
    photo_dir(a / "birds", 10, start=10)
    for i, p in enumerate(sorted(a.rglob("*.*"))):            # the same files, other folder and file names
        (b / ("zz" if i % 2 else "cats")).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, b / ("zz" if i % 2 else "cats") / f"{99 - i}{p.suffix}")
    sa, sb = scan_images([a], 0, 0.2), scan_images([b], 0, 0.2)
    split = lambda s: {f["sha256"]: f["split"] for f in s.files}   # noqa: E731
    assert split(sa) == split(sb) and sum(v == "val" for v in split(sa).values()) == 4
    assert all(set(f) == {"path", "sha256", "split"} for f in sa.files)    # nothing taken from the folder names
    assert split(scan_images([a], 0, 0.2)) == split(sa)
    assert split(scan_images([a], 1, 0.2)) != split(sa)
    # images added later keep every earlier image's split
    from distiller.images import merge
    photo_dir(tmp_path / "more", 10, start=50)
    more = scan_images([tmp_path / "more"], 0, 0.2, known=sa)
    merged = merge(sa, more)
    assert {k: v for k, v in split(merged).items() if k in split(sa)} == split(sa) and len(merged.files) == 30


LABEL_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from distiller.runfolder import Run
from distiller.images import real_images
from distiller.stages.label import label_images
run = Run(Path(sys.argv[1]), device="cpu", offline=True)
kill_after = int(sys.argv[2])
def on_shard(i, n):
    if i == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
label_images(real_images(run), run.teacher(), run.resolution(), "cpu", on_shard=on_shard)
"""


def _started_run(root, pool, tiny_clip):
    from distiller.concepts import parse_concepts
    from distiller.images import scan_images
    from distiller.pipeline import init_run
    from distiller.recipe import load_recipe
    cfg, weights = tiny_clip
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights), "device": "cpu",
                                "images.shard_size": 3})
    init_run(root, rec, parse_concepts("cat,dog"), images=scan_images([pool], rec.seed, rec.images.val_fraction))
    return root


def test_labelling_resumes_after_sigkill_with_byte_identical_shards(tmp_path, tiny_clip):
    pool = photo_dir(tmp_path / "pool", 14)
    ref = _started_run(tmp_path / "ref", pool, tiny_clip)
    killed = _started_run(tmp_path / "killed", pool, tiny_clip)
    run = [sys.executable, "-c", LABEL_SCRIPT]
    assert subprocess.run(run + [str(ref), "-1"], env=python_env()).returncode == 0
    p = subprocess.run(run + [str(killed), "2"], env=python_env())
    assert p.returncode == -signal.SIGKILL
    shards = sorted(x.name for x in (killed / "bank").glob("real_*"))
    assert shards == ["real_00000", "real_00001", "real_00002"]       # 3 of 5 written, atomically
    before = {s: (killed / "bank" / s / "images.npy").stat().st_mtime_ns for s in shards}
    assert subprocess.run(run + [str(killed), "-1"], env=python_env()).returncode == 0
    assert {s: (killed / "bank" / s / "images.npy").stat().st_mtime_ns for s in shards} == before   # nothing redone
    assert len(list((ref / "bank").glob("real_*"))) == 5
    for d in sorted((ref / "bank").glob("real_*")):
        for f in ("images.npy", "logits.npy", "records.json"):
            assert (killed / "bank" / d.name / f).read_bytes() == (d / f).read_bytes(), (d.name, f)
    assert not [x for x in (killed / "bank").iterdir() if x.name.startswith(".")]


def test_tiny_clip_teacher_with_images_through_make(tiny_clip, tmp_path, capsys):
    pool = photo_dir(tmp_path / "pool", 12)
    fast = ["--set", "distill.epochs=2", "--set", 'export.variants=["onnx-fp32"]']   # the student's quality is not the point
    assert main(smoke_args(tiny_clip, tmp_path, "clip", "--images", str(pool), *fast)) == 0
    report = json.loads((tmp_path / "clip" / "report.json").read_text())
    assert report["transfer_set"]["real"] == 12 and report["student"]["selected_on"] == "real"
    capsys.readouterr()
    # adding images to the finished run keeps the surrogates and makes the student anew
    photo_dir(tmp_path / "more", 6, start=40)
    shutil.copy(pool / "img_001.jpg", tmp_path / "more" / "again.jpg")
    assert main(["synthesize", str(tmp_path / "clip"), "--images", str(tmp_path / "more"), "--quiet"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "6 images added: the student and its export are made anew" in err
    assert not (tmp_path / "clip" / "report.json").exists() and not (tmp_path / "clip" / "checkpoints").exists()
    images = json.loads((tmp_path / "clip" / "images.json").read_text())
    assert len(images["files"]) == 18 and images["skipped"][-1]["reason"] == "already in the run"
    recs = [json.loads(x) for x in (tmp_path / "clip" / "bank" / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "real" for r in recs) == 18 and sum(r["source"] == "surrogate" for r in recs) == 96
    assert main(["distill", str(tmp_path / "clip"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "clip"), "--quiet"]) == 0
    assert json.loads((tmp_path / "clip" / "report.json").read_text())["transfer_set"]["real"] == 18


def test_eval_warns_when_the_data_shares_images_with_the_run(image_run, messy, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "dogs").mkdir(parents=True)
    (data / "birds").mkdir()
    shutil.copy(messy / "img_003.png", data / "dogs" / "a.png")        # one of the run's own images
    photo(90).save(data / "birds" / "b.png")
    capsys.readouterr()
    assert main(["eval", str(image_run), "--data", str(data), "--no-teacher", "--no-baseline"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 of the 2 images" in err and "among the run's own --images" in err and "not an accuracy" in err
    assert json.loads((image_run / "eval.json").read_text())["training_overlap"] == 1
    os.remove(data / "dogs" / "a.png")
    photo(91).save(data / "dogs" / "c.png")
    assert main(["eval", str(image_run), "--data", str(data), "--no-teacher", "--no-baseline"]) == 0
    assert "--images" not in capsys.readouterr().err


def test_fresh_head_learns_from_real_images_where_surrogates_alone_do_not(tmp_path):
    """Zebra vs lemon, taught by Lite0 on test-made stripes and yellow disks. A fresh head on a pretrained
    Lite0 (linear probe) learns the teacher's labels from 32 unlabelled images; trained on the surrogate
    bank alone, it stays near chance on the same held-out images."""
    import torch

    from distiller.runfolder import Run
    from distiller.synthesis import teacher_logits
    from runtime import Classifier
    pool = photo_dir(tmp_path / "pool", 32)
    test = photo_dir(tmp_path / "test", 24, start=200)
    student = ["student.init=pretrained", "student.head=fresh", "student.model=tf_efficientnet_lite0",
               "student.input_size=64", "distill.epochs=0", "images.val_fraction=0.25",
               "openset=false"]   # closed-set: Lite0 calls these test-made pictures "other" (neither zebra nor lemon)
    assert main(lite_make(tmp_path, "real", "zebra,lemon", "--images", str(pool), *_lite_sets(*student, "distill.surrogate_weight=0"))) == 0
    assert main(lite_make(tmp_path, "bank", "zebra,lemon", *_lite_sets(*student))) == 0
    paths = sorted(test.iterdir())
    from distiller.images import square
    imgs = torch.from_numpy(np.stack([square(str(p), 64) for p in paths]))
    truth = teacher_logits(Run(tmp_path / "real", device="cpu", offline=True).teacher(), imgs).argmax(1).numpy()
    assert 0.25 < truth.mean() < 0.75                      # the teacher sees both concepts in the test images

    def balanced_agreement(run):
        clf = Classifier.load(run, exact=True)
        pred = np.array([clf.labels.index(clf.classify(str(p))[0][0]) for p in paths])
        return np.mean([(pred[truth == k] == k).mean() for k in (0, 1)])
    real, bank = balanced_agreement(tmp_path / "real"), balanced_agreement(tmp_path / "bank")
    assert real >= 0.85 and bank <= 0.7 and real - bank >= 0.2, (real, bank)


def test_both_sources_weighted_zero_is_refused(tmp_path, capsys):
    assert main(lite_make(tmp_path, "w", "dogs,birds", *_lite_sets("distill.surrogate_weight=0", "distill.real_weight=0"))) == 2
    assert "both 0" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_scan_refuses_when_nothing_new(tmp_path):
    from distiller.images import scan_images
    d = photo_dir(tmp_path / "p", 3)
    known = scan_images([d], 0, 0.2)
    with pytest.raises(UserError, match="no new usable image"):
        scan_images([d], 0, 0.2, known=known)
