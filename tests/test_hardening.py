"""Every defect a new user hit: one clear line and exit 2 with nothing written, Ctrl-C, file modes,
resumable stubs, resolved paths, readable names, huge class lists."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import python_env, smoke_args
from distiller.cli import INTERRUPTED, main


def _one_line_exit_2(args, capsys, expect: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert expect in " ".join(err.split()), err
    assert "Traceback" not in err
    return err


def _make(tiny_clip, out: Path, *extra: str, **replace: str) -> list[str]:
    """The smoke make of a run named "bad" under ``out``, with flags replaced (``classes="a,b"``)."""
    args = smoke_args(tiny_clip, out, "bad", *extra)
    for flag, value in replace.items():
        args[args.index("--" + flag) + 1] = value
    return args


def _nothing_written(out: Path) -> None:
    assert not (out / "bad").exists(), list(out.rglob("*")) if out.exists() else None


@pytest.mark.parametrize("sets, expect", [
    (["synthesis.shard_size=0"], "recipe.synthesis.shard_size = 0 is out of range: use a value >= 1"),
    (["synthesis.val_every=0"], "recipe.synthesis.val_every = 0 is out of range: use a value >= 2"),
    (["distill.batch_size=0"], "recipe.distill.batch_size = 0 is out of range"),
    (["export.calibration_images=0"], "recipe.export.calibration_images = 0 is out of range"),
    (["export.latency_runs=0"], "recipe.export.latency_runs = 0 is out of range"),
    (["synthesis.steps=-5"], "recipe.synthesis.steps = -5 is out of range"),
    (["synthesis.lr=0"], "recipe.synthesis.lr = 0.0 is out of range: use a value > 0.0"),
    (["synthesis.crop_scale=[0.0, 1.0]"], "recipe.synthesis.crop_scale = [0.0, 1.0] is out of range"),
    (["export.max_drop=101"], "use a value >= 0.0 and <= 100.0"),
])
def test_numeric_settings_are_range_checked_before_anything_is_written(tiny_clip, tmp_path, capsys, sets, expect):
    out = tmp_path / "runs"
    _one_line_exit_2(_make(tiny_clip, out, *[a for s in sets for a in ("--set", s)]), capsys, expect)
    _nothing_written(out)


@pytest.mark.parametrize("flag, value, expect", [
    ("--styles", "-1", "recipe.prompts.styles = -1 is out of range"),
    ("--seed", "-1", "recipe.seed = -1 is out of range"),
])
def test_negative_flags_are_range_checked(tiny_clip, tmp_path, capsys, flag, value, expect):
    out = tmp_path / "runs"
    _one_line_exit_2(_make(tiny_clip, out, flag, value), capsys, expect)
    _nothing_written(out)


def test_out_that_is_a_file_or_read_only(tiny_clip, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_exit_2(_make(tiny_clip, f), capsys, "is a file, not a folder")
    _one_line_exit_2(_make(tiny_clip, f / "deeper"), capsys, "is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_line_exit_2(_make(tiny_clip, ro), capsys, "is read-only")
        _one_line_exit_2(_make(tiny_clip, ro / "runs"), capsys, "is read-only")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_name_stays_inside_out(tiny_clip, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    args = smoke_args(tiny_clip, out, "../../x")
    _one_line_exit_2(args, capsys, "--name '../../x': use a plain folder name")
    assert not (tmp_path / "x").exists() and not out.exists()


@pytest.mark.parametrize("classes, expect", [
    ("cat,cat\u200b", "U+200B ZERO WIDTH SPACE"),
    ("\x1b[31mcat,dog", "U+001B"),
    ("cat,d\u202eog", "U+202E"),
])
def test_invisible_and_control_characters_in_labels(tiny_clip, tmp_path, capsys, classes, expect):
    out = tmp_path / "runs"
    err = _one_line_exit_2(_make(tiny_clip, out, classes=classes), capsys, expect)
    assert "\x1b" not in err and "\u200b" not in err
    _nothing_written(out)


def test_binary_classes_file(tiny_clip, tmp_path, capsys):
    f = tmp_path / "classes.bin"
    f.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "runs"
    args = _make(tiny_clip, out)
    i = args.index("--classes")
    args[i:i + 2] = ["--classes-file", str(f)]
    _one_line_exit_2(args, capsys, f"classes file {f} is not UTF-8 text")
    _nothing_written(out)


@pytest.mark.parametrize("content, expect", [
    ("{not json", "is not valid JSON"),
    ('{"embed_dim": 32}', "is not an open_clip model config"),
    ("[1, 2]", "is not an open_clip model config"),
])
def test_malformed_teacher_config(tiny_clip, tmp_path, capsys, content, expect):
    cfg = tmp_path / "broken.json"
    cfg.write_text(content)
    out = tmp_path / "runs"
    _one_line_exit_2(_make(tiny_clip, out, teacher=str(cfg)), capsys, expect)
    _nothing_written(out)


@pytest.mark.parametrize("kind", ["text", "empty", "truncated"])
def test_unreadable_pretrained_file(tiny_clip, tmp_path, capsys, kind):
    weights = tmp_path / "w.pt"
    if kind == "text":
        weights.write_text("these are not weights\n")
    elif kind == "empty":
        weights.write_bytes(b"")
    else:
        data = tiny_clip[1].read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "runs"
    err = _one_line_exit_2(_make(tiny_clip, out, pretrained=str(weights)), capsys, f"teacher weights file {weights} cannot be read")
    assert err.rstrip().endswith("with --pretrained")   # a whole sentence, not one cut off
    _nothing_written(out)


def test_huge_class_list_stops_with_an_estimate_unless_yes(tiny_clip, tmp_path, capsys):
    out = tmp_path / "runs"
    err = _one_line_exit_2(_make(tiny_clip, out, classes=",".join(f"thing{i}" for i in range(1000))), capsys,
                           "56471 surrogate images (8471 of them negatives for 'other') in 4706 shards x 10 steps: about")
    assert "of synthesis on this machine" in err and "synthesis.confirm_above = 20000" in err and "--yes" in err
    _nothing_written(out)


def test_plan_is_printed_and_confirm_above_is_a_recipe_key(tiny_clip, tmp_path, capsys):
    out = tmp_path / "runs"
    _one_line_exit_2(_make(tiny_clip, out, "--set", "synthesis.confirm_above=50"), capsys,
                     "113 surrogate images (17 of them negatives for 'other') in 10 shards x 10 steps")
    _nothing_written(out)


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    from distiller.concepts import parse_concepts
    from distiller.pipeline import init_run
    from distiller.recipe import load_recipe
    from runtime import UserError
    concepts = parse_concepts("cat,dog")
    root = tmp_path / "run"
    init_run(root, load_recipe("smoke", {"synthesis.steps": 7}), concepts)   # a start that got no further
    init_run(root, load_recipe("smoke", {"synthesis.steps": 9}), concepts)   # corrected: starts over, no --exist-ok
    assert "steps = 9" in (root / "recipe.toml").read_text()
    (root / "styles.pt").write_bytes(b"learnt")                              # now a stage has done work
    with pytest.raises(UserError, match="exists with other classes, settings or --images"):
        init_run(root, load_recipe("smoke", {"synthesis.steps": 11}), concepts)


def test_relative_teacher_paths_are_stored_resolved(tiny_clip, tmp_path, monkeypatch):
    import dataclasses

    from distiller.recipe import default_recipe
    from distiller.teachers import resolve_paths
    cfg, weights = tiny_clip
    monkeypatch.chdir(cfg.parent)
    got = resolve_paths(dataclasses.replace(default_recipe().teacher, model=cfg.name, pretrained=weights.name))
    assert got.model == str(cfg.resolve()) and got.pretrained == str(weights.resolve())
    assert resolve_paths(default_recipe().teacher).pretrained == "laion2b_s34b_b79k"


def test_smoke_run_stores_absolute_teacher_paths(smoke_run):
    from distiller.runfolder import Run
    t = Run(smoke_run).recipe.teacher
    assert Path(t.model).is_absolute() and Path(t.pretrained).is_absolute()


def test_run_folder_files_are_readable_by_others(smoke_run):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for rel in ("report.json", "recipe.toml", "concepts.json", "bank/manifest.jsonl", "bank/plan.json", "timings.json",
                "checkpoints/best.pt", "student.onnx", "student.int8.onnx", "openvino/student.xml", "openvino/student.bin",
                "openvino/student.json", "samples.png", "bank/shard_00000/records.json"):
        assert stat.S_IMODE((smoke_run / rel).stat().st_mode) == want, rel
    assert stat.S_IMODE((smoke_run / "bank/shard_00000").stat().st_mode) == 0o777 & ~mask


def test_atomic_writes_respect_the_umask(tmp_path):
    from runtime.atomic import write_json
    from distiller.torchfiles import save_torch
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_torch({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt"]


def test_readable_run_names_in_any_script():
    from distiller.cli.make import _slug
    assert _slug(["猫", "🐶"]) == "猫-dog-face"
    assert _slug(["cats", "dogs"]) == "cats-dogs"
    assert _slug(["Golden Retrievers", "tabby cat"]) == "golden-retrievers-tabby-cat"


@pytest.fixture()
def copied_run(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    return run


def test_corrupt_report_json(copied_run, capsys):
    (copied_run / "report.json").write_text('{"deployable": "student.onnx", "export": ')
    _one_line_exit_2(["predict", str(copied_run), str(copied_run / "samples.png")], capsys, "report.json is damaged")
    _one_line_exit_2(["bench", str(copied_run), "--runs", "2"], capsys, "report.json is damaged")


@pytest.mark.parametrize("damage, expect", [
    ("garbage", "OpenVINO cannot read it"),
    ("no-bin", "its weights file student.bin is missing"),
    ("truncated-bin", "OpenVINO cannot"),
])
def test_broken_openvino_files(copied_run, capsys, damage, expect):
    xml = copied_run / "openvino" / "student.xml"
    if damage == "garbage":
        xml.write_text("<net><this is not IR")
    elif damage == "no-bin":
        xml.with_suffix(".bin").unlink()
    else:
        b = xml.with_suffix(".bin")
        b.write_bytes(b.read_bytes()[:1000])
    _one_line_exit_2(["predict", str(xml), str(copied_run / "samples.png")], capsys, expect)


@pytest.mark.parametrize("args, expect", [
    # the wording of a range error is click's or typer's (it differs between their versions)
    (["bench", "{run}", "--runs", "0"], "Invalid value for '--runs'"),
    (["bench", "{run}", "--batch", "0"], "Invalid value for '--batch'"),
    (["predict", "{run}", "{img}", "--threads", "-3"], "Invalid value for '--threads'"),
    (["predict", "{run}", "{img}", "-k", "0"], "Invalid value for '--top-k'"),
    (["predict", "{run}", "{img}", "--backend", "tensorrt"], "unknown backend 'tensorrt': use auto, onnxruntime, openvino"),
])
def test_bad_runtime_options(smoke_run, capsys, args, expect):
    args = [a.format(run=smoke_run, img=smoke_run / "samples.png") for a in args]
    err = _one_line_exit_2(args, capsys, expect)
    assert "pip install" not in err


def test_runtime_api_rejects_bad_threads_and_top_k(smoke_run):
    from runtime import Classifier, UserError
    with pytest.raises(UserError, match="threads = -3"):
        Classifier.load(smoke_run, threads=-3)
    with pytest.raises(UserError, match="top_k = 0"):
        Classifier.load(smoke_run).classify(smoke_run / "samples.png", top_k=0)


def test_a_truncated_checkpoint_is_an_error_not_an_interrupt(copied_run, capsys):
    last = copied_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    err = _one_line_exit_2(["distill", str(copied_run), "--quiet"], capsys, "last.pt is damaged or not written by distiller")
    assert "interrupted" not in err


def test_runtime_falls_back_by_the_eligible_field(copied_run, monkeypatch):
    """The deployable file's backend missing: the fastest *eligible* variant runs (never by status text)."""
    from runtime import classifier
    rep = json.loads((copied_run / "report.json").read_text())
    rows = rep["export"]["variants"]
    assert all(isinstance(r["eligible"], bool) for r in rows.values())
    rep["deployable"] = "openvino/student.xml"
    for name, r in rows.items():
        r["status"] = "loses 99 points"   # the text no longer decides anything
        r["eligible"] = name in ("openvino-fp32", "onnx-fp32")
    (copied_run / "report.json").write_text(json.dumps(rep))
    monkeypatch.setattr(classifier, "installed", lambda backend: backend == "onnxruntime")
    assert classifier.resolve_model_path(copied_run) == copied_run / "student.onnx"
    rows["onnx-fp32"]["eligible"] = False
    (copied_run / "report.json").write_text(json.dumps(rep))
    with pytest.raises(classifier.UserError, match="none of its models can run"):
        classifier.resolve_model_path(copied_run)


def test_eval_scores_what_the_installed_backends_run(copied_run, tmp_path, monkeypatch):
    from PIL import Image

    from distiller.bank import Bank
    from distiller.evaluation import evaluate_models
    from runtime import classifier
    data = tmp_path / "data"
    imgs, _, recs = Bank(copied_run / "bank").load("val")
    for i, (im, r) in enumerate(zip(imgs, recs)):
        (data / r["label"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(data / r["label"] / f"{i}.png")
    monkeypatch.setattr(classifier, "installed", lambda backend: backend == "onnxruntime")
    monkeypatch.setattr("distiller.evaluation.installed", classifier.installed)
    _, results, notes = evaluate_models(copied_run, data, teacher=False, baseline=False)
    assert set(results) == {"student.onnx", "student.int8.onnx"}
    assert sum("not scored: openvino is not installed" in n for n in notes) == 2


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_with_the_resume_hint_last(tiny_clip, tmp_path, capsys, sig, code):
    """SIGTERM as Ctrl-C, exit 143. (And while it runs, the run folder has one writer: a second make or export
    exits 2 at once.)"""
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "distiller", *smoke_args(tiny_clip, out, "int")[:-1]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env())
    bank = out / "int" / "bank"
    deadline = time.time() + 240
    while not list(bank.glob("shard_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    for second in (smoke_args(tiny_clip, out, "int"), ["export", str(out / "int"), "--quiet"])[:2 if sig == signal.SIGINT else 0]:
        t0 = time.time()
        err = _one_line_exit_2(second, capsys, f"is being written by another distiller process (pid {proc.pid})")
        assert time.time() - t0 < 20 and "wait for it or use another --name" in err
    proc.send_signal(sig)
    t0 = time.time()
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 15, "the signal must end the process within seconds"
    assert proc.returncode == code, err.decode()
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines[-1] == INTERRUPTED
    assert "Traceback" not in err.decode()
    timings = json.loads((out / "int" / "timings.json").read_text())
    assert timings["synthesize"] > 0   # the interrupted part of the stage is kept


class _RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_run_folder_never_runs_code(copied_run, tmp_path, capsys):
    """Every .pt the smoke run holds, replaced by a code-running pickle: report, export (which reloads the student)
    and distill (which resumes from last.pt) never run it, and say in one line what is wrong."""
    import torch
    marker = tmp_path / "PWNED"
    files = sorted(p.relative_to(copied_run) for p in copied_run.rglob("*.pt"))
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "styles.pt"} <= {str(p) for p in files}
    for rel in files:
        run = tmp_path / f"run-{rel.name}"
        shutil.copytree(copied_run, run)
        if rel.name == "best.pt":   # export reloads the student only when it has not exported yet
            for done in ("export.json", "report.json", "report.html"):
                (run / done).unlink(missing_ok=True)
        torch.save({"model": _RunsCode(marker), "epoch": 0}, run / rel)
        for cmd in (["export", str(run), "--quiet"], ["report", str(run)], ["distill", str(run), "--quiet"]):
            code = main(cmd)
            err = capsys.readouterr().err
            assert not marker.exists(), (rel, cmd)
            assert code in (0, 2) and "Traceback" not in err, (rel, cmd, err)
            if cmd[0] == "export" and rel.name == "best.pt":   # the student it must reload: refused, in one line
                assert code == 2 and "best.pt is damaged or not written by distiller" in " ".join(err.split()), err


def test_labels_print_literally_never_as_markup(copied_run, capsys, monkeypatch):
    """Labels like ``[/]`` or ``cat [tabby]`` (here edited into the OpenVINO model's metadata) print as they are in
    predict's table and in the make summary's table: no MarkupError, no text swallowed."""
    from rich.console import Console

    from distiller.cli.ui import artifacts_table
    sidecar = copied_run / "openvino" / "student.json"
    meta = json.loads(sidecar.read_text())
    meta["labels"] = ["cat [tabby]", "[/]"]
    sidecar.write_text(json.dumps(meta))
    monkeypatch.chdir(copied_run)   # short paths: the table keeps each label on one line
    assert main(["predict", "openvino/student.xml", "samples.png", "--top-k", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cat [tabby]" in out and "[/]" in out
    report = json.loads((copied_run / "report.json").read_text())
    report["labels"] = ["cat [bold]x[/bold]", "[/]"]
    con = Console(record=True, width=200)
    con.print(artifacts_table(report))
    assert "distiller: cat [bold]x[/bold], [/]" in con.export_text()


@pytest.mark.parametrize("name", ["../elsewhere/m.onnx", "/etc/passwd", "link.onnx"])
def test_a_report_cannot_send_the_runtime_outside_the_run_folder(copied_run, tmp_path, capsys, name):
    from runtime import Classifier, UserError
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(copied_run / "student.onnx", outside / "m.onnx")
    (copied_run / "link.onnx").symlink_to(outside / "m.onnx")
    report = json.loads((copied_run / "report.json").read_text())
    report["deployable"] = name
    (copied_run / "report.json").write_text(json.dumps(report))
    _one_line_exit_2(["predict", str(copied_run), str(copied_run / "samples.png")], capsys,
                     "names a model outside the run folder")
    with pytest.raises(UserError, match="outside the run folder"):
        Classifier.load(copied_run)


def test_a_killed_export_resumes_with_the_variants_it_measured(copied_run, capsys):
    """SIGKILL in the middle of export: the rerun keeps every variant already built and judged (the same fidelity
    numbers), redoes the rest, times them all together, and sweeps the half-written files."""
    for done in ("export.json", "report.json", "report.html"):
        (copied_run / done).unlink()
    partial = copied_run / "export.partial.json"
    proc = subprocess.Popen([sys.executable, "-m", "distiller", "export", str(copied_run), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=python_env())
    deadline = time.time() + 240
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(partial.read_text())
    (copied_run / ".student.int8.dead.tmp.onnx").write_bytes(b"half")   # what a kill mid-write leaves
    assert main(["export", str(copied_run), "--quiet"]) == 0
    after = json.loads((copied_run / "export.json").read_text())["variants"]
    kept = ("agreement", "cosine", "cosine_by_source", "size_mb", "build_s")
    assert before and all({k: after[n][k] for k in kept} == {k: r[k] for k in kept} for n, r in before.items())
    assert set(after) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    assert not partial.exists() and not list(copied_run.glob(".*.tmp*"))
    assert all(r["latency_ms"]["runs"] > 0 for r in after.values())


def test_predict_skips_a_fifo_instead_of_hanging(smoke_run, tmp_path, capsys):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    t0 = time.time()
    assert main(["predict", str(smoke_run), str(smoke_run / "samples.png"), str(fifo)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert time.time() - t0 < 40 and "x.jpg: not a regular file" in err


@pytest.mark.parametrize("extra, expect", [
    (["--classes", "cat,Other"], "other_label 'other' is also one of the classes"),
    (["--classes", "cat," + "d" * 101], "is 101 characters long: keep labels within 100"),
])
def test_label_clashes_and_lengths(tiny_clip, tmp_path, capsys, extra, expect):
    args = smoke_args(tiny_clip, tmp_path / "runs", "lab")
    args[args.index("--classes") + 1] = extra[1]
    _one_line_exit_2(args + ["--set", "openset=true"], capsys, expect)
    assert not (tmp_path / "runs" / "lab").exists()


def test_the_openvino_cache_is_bounded_and_can_be_turned_off(tmp_path, monkeypatch):
    from runtime.classifier import ov_cache_dir, prune_cache
    monkeypatch.setenv("DISTILLER_OV_CACHE", "off")
    assert ov_cache_dir() is None
    monkeypatch.setenv("DISTILLER_OV_CACHE", str(tmp_path))
    assert ov_cache_dir() == tmp_path
    for i in range(5):
        f = tmp_path / f"blob{i}"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))   # blob0 least recently used
    prune_cache(tmp_path, 2500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob3", "blob4"]
