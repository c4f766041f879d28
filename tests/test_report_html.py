"""report.html: self-contained, every applicable section, plots from matplotlib, checked in a real browser."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from distiller.cli import main

SECTIONS = ["Verdict", "Concepts", "Surrogate images", "Training", "Deployment", "Timings"]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _static_checks(page: str) -> None:
    """Nothing outside the file is referenced: it reads offline and as an e-mail attachment."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "@import" not in page
    assert not re.search(r"url\(\s*['\"]?(?!data:)", page)
    assert "<script" not in page.lower()


def _data_images(page: str) -> list[Image.Image]:
    out = []
    for mime, b64 in re.findall(r'<img src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        out.append(img)
    return out


def test_smoke_run_writes_a_self_contained_report(smoke_run, capsys):
    page = (smoke_run / "report.html").read_text()
    _static_checks(page)
    for s in SECTIONS:
        assert f"<h2>{s}</h2>" in page, s
    imgs = _data_images(page)
    assert len(imgs) >= 3 and page.count("<img") == len(imgs)   # every image is an embedded data URI that decodes
    assert "Accuracy on real images" not in page                # eval has not been run on it
    assert (smoke_run / "report.html").stat().st_size < 5e6
    assert 'name=viewport content="width=device-width' in page and "overflow-x:auto" in page   # phones: tables scroll
    for label in ("cat", "dog"):
        assert f"{label}: a row per style" in page
    assert "resnet10t" in page and "student.int8.onnx" in page
    # the smoke recipe is open-set: the page says what the model answers for none of the classes, and why
    import html

    from distiller.openset import describe_rule
    from runtime.openset import OpenSetRule
    rule = OpenSetRule.from_json(json.loads((smoke_run / "export.json").read_text())["open_set"])
    assert f"<p>{html.escape(describe_rule(rule, 'other'))}</p>" in page
    assert "surrogate images of the classes" in page and f"under {rule.threshold:.4g}" in page


def test_report_picks_up_eval_results(smoke_run, tmp_path, capsys):
    from distiller.bank import Bank
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    data = tmp_path / "data"
    imgs, _, recs = Bank(run / "bank").load("val")
    for i, (im, r) in enumerate(zip(imgs, recs)):
        d = data / ("art" if i % 2 else "photo") / r["label"]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    assert main(["eval", str(run), "--data", str(data), "--no-baseline"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["images"] == len(recs) and len(ev["content_hash"]) == 64 and "teacher" in ev["results"]
    row = ev["results"]["student.onnx"]["rows"][0]
    assert set(row["per_class"]) <= {"0", "1"} and all(0 <= v["recall"] <= 1 for v in row["per_class"].values())
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert "<h2>Accuracy on real images</h2>" in page and ev["content_hash"][:16] in page
    assert "Known classes against images of other things" not in page      # no --other-data given
    _static_checks(page)
    assert len(_data_images(page)) == len(_data_images((smoke_run / "report.html").read_text())) + 1


def test_make_names_the_report_first_in_its_last_lines(tiny_clip, tmp_path, capsys):
    from conftest import smoke_args
    args = smoke_args(tiny_clip, tmp_path, "names", "--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]',
                      "--set", "synthesis.images_per_class=8")
    assert main(args) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    tail = out[out.index(next(ln for ln in out if ln.startswith("stage times"))) + 1:]
    assert tail[0].startswith("report ") and tail[0].split()[1].endswith("report.html")
    assert (tmp_path / "names" / "report.html").is_file()


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (CI installs it: apt-get install chromium)")
def test_report_renders_in_a_real_browser(smoke_run, tmp_path):
    page = (smoke_run / "report.html").resolve()
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    r = subprocess.run([BROWSER, *flags, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280) and shot.stat().st_size > 20_000
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, "a flat page: nothing rendered"
    dom = subprocess.run([BROWSER, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for s in SECTIONS:
        assert f"<h2>{s}</h2>" in dom, s
    assert len(_data_images(dom)) >= 3
