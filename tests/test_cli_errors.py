"""Bad input: one line naming the problem and the fix, exit code 2, nothing written."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import python_env, smoke_args
from distiller.cli import main


@pytest.mark.parametrize("change, expect", [
    (["--classes", "cat"], "need at least 2 classes"),
    (["--classes", "cats,dog,Cat"], "same class"),
    (["--classes", "cat,,  ,"], "need at least 2 classes"),
    (["--teacher", "ViT-B-33"], "unknown teacher 'ViT-B-33': did you mean ViT-B-32"),
    (["--teacher", "nonexistent.json"], "teacher config nonexistent.json does not exist"),
    (["--pretrained", "/no/such/weights.pt"], "teacher weights file /no/such/weights.pt does not exist"),
    (["--recipe", "smok"], "unknown recipe 'smok': did you mean smoke"),
    (["--target", "gpu9"], "unknown target 'gpu9'"),
    (["--set", "synthesis.stepz=3"], "unknown recipe key 'synthesis.stepz': did you mean steps"),
    (["--set", "synthesis.steps=many"], "recipe.synthesis.steps must be a whole number"),
    (["--prompts", "fancy"], "unknown prompt source 'fancy'"),
    (["--set", "synthesis.images_per_class=4"], "need at least 2 (train and val)"),
    (["--set", "calibration.steps=0"], "recipe.calibration.steps = 0 is out of range: use a value >= 1"),
    (["--set", "calibration.source=photos"], "calibration.source"),
    (["--set", "calibration.source=real"], "calibration.source = real calibrates INT8 on your own images: give --images"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_clip, tmp_path, capsys, change, expect):
    args = smoke_args(tiny_clip, tmp_path / "runs", "bad")
    for i in range(0, len(change), 2):  # replace or append the flag
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err, err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_offline_missing_hub_weights_fail_fast(tmp_path, capsys):
    import time
    t = time.time()
    assert main(["make", "--classes", "cat,dog", "--offline", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "--pretrained FILE" in err
    assert time.time() - t < 30
    assert not any(tmp_path.iterdir())


def test_console_entry_point_exit_code_and_help_is_fast(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distiller", "make", "--classes", "solo", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=python_env(), timeout=120)
    assert r.returncode == 2 and "need at least 2 classes" in r.stderr and "Traceback" not in r.stderr
    code = "import sys; from distiller.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=60)
    assert r.returncode == 0, r.stderr


def test_error_text_with_brackets_is_printed_verbatim(capsys):
    # rich markup must not eat "[...]" in our messages (e.g. pip extras)
    assert main(["predict", "/no/such/model[train].onnx", "x.png"]) == 2
    assert "model[train].onnx" in capsys.readouterr().err


def test_help_shows_no_type_beside_flags(capsys):
    assert main(["make", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--exist-ok" in out and "--yes" in out and "--verbose" in out
    assert "<bool>" not in out, [ln for ln in out.splitlines() if "<bool>" in ln]
    # options that take a value show it as a word, never as a Python type (<list[Path]>, <str>)
    assert "--images" in out and "DIR" in out and "A,B,..." in out
    assert not [ln for ln in out.splitlines() if "<list" in ln or "<str>" in ln or "<path>" in ln]


def test_usage_errors_are_one_line_with_exit_2(capsys):
    assert main(["make", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "--no-such-flag" in err, err
