"""Choosing the deployable variant, NNCF's repair path, and `distiller bench`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distiller.cli import main
from exporter.variants import VARIANTS, select
from runtime.exports import Latency, ShipRule, VariantRecord


def _row(precision, agreement, p50, cosine=1.0, by_source=None):
    return VariantRecord(f"{precision}-{p50}", precision, agreement, Latency(p50, p50, p50, p50, 1), cosine=cosine,
                         agreement_by_source=by_source)


def test_select_fastest_within_max_drop():
    rows = {"onnx-fp32": _row("fp32", 1.0, 2.0), "openvino-fp32": _row("fp32", 1.0, 1.5),
            "onnx-int8": _row("int8", 0.995, 1.0), "openvino-int8": _row("int8", 0.97, 0.5)}
    best, notes = select(rows, ShipRule(max_drop=1.0))
    assert best == "onnx-int8"
    assert rows["openvino-int8"].status.startswith("loses 3.0 points")
    assert rows["openvino-fp32"].status.startswith("slower")
    assert any("openvino-int8" in n and "not deployable" in n for n in notes)


def test_select_with_max_drop_zero_ships_fp32_and_says_so():
    rows = {"onnx-fp32": _row("fp32", 1.0, 2.0), "onnx-int8": _row("int8", 0.99, 1.0)}
    best, notes = select(rows, ShipRule(max_drop=0.0))
    assert best == "onnx-fp32"
    assert any("shipping FP32" in n and "every INT8 variant lost more than the ship rule allows" in n for n in notes)
    rows = {"onnx-fp32": _row("fp32", 1.0, 1.0), "onnx-int8": _row("int8", 1.0, 3.0)}
    best, notes = select(rows, ShipRule(max_drop=1.0))
    assert best == "onnx-fp32" and any("no INT8 variant the ship rule allows was 1.0x faster than FP32" in n for n in notes)


def test_int8_must_be_min_speedup_faster_than_fp32():
    rows = {"openvino-fp32": _row("fp32", 1.0, 1.5), "openvino-int8": _row("int8", 1.0, 1.37)}
    best, notes = select(rows, ShipRule(max_drop=1.0, min_speedup=1.2))
    assert best == "openvino-fp32"
    assert rows["openvino-int8"].status == "only 1.09x faster than FP32 (min_speedup 1.2)"
    assert any("no INT8 variant the ship rule allows was 1.2x faster" in n for n in notes)
    assert select(rows, ShipRule(max_drop=1.0, min_speedup=1.05))[0] == "openvino-int8"


def test_int8_judged_on_too_few_images_does_not_ship():
    rows = {"onnx-fp32": _row("fp32", 1.0, 2.0), "onnx-int8": _row("int8", 1.0, 1.0)}
    best, notes = select(rows, ShipRule(max_drop=1.0, min_fidelity_images=24), {"bank": 8})
    assert best == "onnx-fp32" and rows["onnx-int8"].eligible is False
    assert rows["onnx-int8"].status == "judged on only 8 images the quantizers did not see (export.min_fidelity_images 24)"
    assert any("shipping FP32" in n and "make a bigger bank or give --images" in n for n in notes)
    assert select(rows, ShipRule(max_drop=1.0, min_fidelity_images=24), {"bank": 24})[0] == "onnx-int8"


def test_ship_rule_judges_top1_on_the_users_images_and_cosine_on_every_image():
    by = {"statistics": 0.90, "bank": 0.9, "real": 1.0}
    rows = {"onnx-fp32": _row("fp32", 1.0, 2.0), "onnx-int8": _row("int8", 0.93, 1.0, cosine=0.99, by_source=by)}
    # real images judge top-1: the synthetic images' flips do not count
    assert select(rows, ShipRule(max_drop=1.0, min_cosine=0.985, judged_on="real"), {"real": 40, "statistics": 64})[0] == "onnx-int8"
    # data-free (no source judges top-1): the cosine alone, and a variant below min_cosine does not ship
    assert select(rows, ShipRule(max_drop=1.0, min_cosine=0.985, judged_on=None), {"statistics": 64})[0] == "onnx-int8"
    assert rows["onnx-int8"].drop_points == 0.0
    best, notes = select(rows, ShipRule(max_drop=1.0, min_cosine=0.995, judged_on=None), {"statistics": 64})
    assert best == "onnx-fp32" and rows["onnx-int8"].status == "keeps a logit cosine of 0.9900 with FP32 (min_cosine 0.995)"
    # judged on the bank (a bank-calibrated student): its agreement there decides
    best, _ = select(rows, ShipRule(max_drop=1.0, judged_on="bank"), {"bank": 40})
    assert best == "onnx-fp32" and rows["onnx-int8"].status == "loses 10.0 points of top-1 agreement on the bank images (max_drop 1.0)"


def test_calibration_and_fidelity_images_never_overlap():
    from exporter import quantizer_split
    calib, check = quantizer_split(100, 16, 40)
    assert len(calib) == 16 and len(check) == 40 and not set(calib) & set(check)
    assert calib[0] == 0 and calib[-1] == 99                     # spread over the bank, not its first shards
    calib, check = quantizer_split(8, 64, 256)                   # a bank smaller than the calibration set
    assert list(calib) == list(range(8)) and len(check) == 0
    calib, check = quantizer_split(20, 4, 0)                     # the val shards already fill the check
    assert len(calib) == 4 and len(check) == 0
    calib, check = quantizer_split(40, 64, 248, reserve=16)      # a small bank: room left for the fidelity check
    assert (len(calib), len(check)) == (24, 16) and not set(calib) & set(check)
    calib, check = quantizer_split(8, 64, 248, reserve=16)       # but calibration keeps half the train images
    assert (len(calib), len(check)) == (4, 4)


def test_every_registered_variant_has_a_distinct_file():
    files = [VARIANTS.get(n).file for n in VARIANTS.names()]
    assert len(files) == len(set(files))
    assert {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8", "openvino-int8-acc", "onnx-int8-qop"} <= set(VARIANTS.names())


def _copy_run(smoke_run, dst, **export):
    from distiller.recipe import tomllib

    import tomli_w
    for item in ("recipe.toml", "concepts.json", "bank", "checkpoints"):
        src = smoke_run / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / item)
    rec = tomllib.loads((dst / "recipe.toml").read_text())
    rec["export"].update(export)
    (dst / "recipe.toml").write_text(tomli_w.dumps(rec))
    return dst


def test_repair_and_candidate_variants_on_a_real_student(smoke_run, tmp_path):
    import torch

    from distiller.distill import load_student
    from distiller.runfolder import Run
    from distiller.bank import Bank
    from distiller.pipeline import export_run
    from distiller.stages import DistillStage
    from exporter import quantizer_split
    from runtime import Classifier
    from runtime.preprocess import preprocess
    run = _copy_run(smoke_run, tmp_path, max_drop=0.0, latency_runs=5,
                    variants=["onnx-fp32", "onnx-int8-skip-ends", "onnx-int8-percentile", "openvino-int8-acc"])
    report = export_run(Run(run))
    rows = report["export"]["variants"]
    assert set(rows) == {"onnx-fp32", "openvino-fp32", "onnx-int8-skip-ends", "onnx-int8-percentile", "openvino-int8-acc"}
    assert report["export"]["failed"] == {}
    # NNCF's accuracy control tunes on the calibration images, which the fidelity check never sees: with
    # max_drop 0 it keeps every decision there; the selection judges it on the other bank images
    r = Run(run)
    calib_rows, check_rows = quantizer_split(len(Bank(r.paths.bank).load("train")[0]), r.recipe.export.calibration_images, 256)
    assert not set(calib_rows) & set(check_rows)
    assert (report["export"]["calibration_images"], report["export"]["fidelity_images"]) == (16, 97)
    spec = DistillStage.spec(r)
    calib = np.stack([preprocess(im, spec.preprocess) for im in Bank(r.paths.bank).load("train")[0][calib_rows]])
    with torch.no_grad():
        ref = load_student(spec, DistillStage.checkpoints(r).best)(torch.from_numpy(calib)).numpy()
    tuned = Classifier.load(run / rows["openvino-int8-acc"]["file"]).logits(calib)
    assert (tuned.argmax(1) == ref.argmax(1)).all()
    best = report["export"]["deployable_variant"]
    assert rows[best]["drop_points"] <= 0.0
    assert all(r["status"] for r in rows.values())
    for r in rows.values():
        assert (run / r["file"]).is_file()


def test_bench_select_rewrites_deployable(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    assert main(["bench", str(run), "--runs", "5", "--warmup", "1", "--batch", "4", "--select", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["models"]) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    for r in result["models"].values():
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["throughput_ips"] > 0 and 0.0 <= r["agreement"] <= 1.0
    assert result["models"]["onnx-fp32"]["agreement"] == 1.0
    assert result["teacher"]["latency_ms"]["p50"] > 0 and (run / "teacher_image.onnx").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["selected_on"]["cpu"] == result["cpu"]
    rows = report["export"]["variants"]
    best = report["export"]["deployable_variant"]
    assert report["deployable"] == rows[best]["file"] == result["deployable"]
    p50 = {n: result["models"][n]["latency_ms"]["p50"] for n in rows}
    fastest_fp32 = min(p50[n] for n, r in rows.items() if r["precision"] == "fp32")
    exp = report["export"]
    eligible = [n for n, r in rows.items() if r["precision"] == "fp32" or
                (r["drop_points"] <= exp["max_drop"] and fastest_fp32 / p50[n] >= exp["min_speedup"])]
    assert best == min(eligible, key=p50.get)


def test_bench_model_files_and_errors(smoke_run, capsys):
    files = [str(smoke_run / "student.onnx"), str(smoke_run / "student.int8.onnx")]
    assert main(["bench", *files, "--runs", "3", "--warmup", "1", "--batch", "2", "--include-preprocess", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["include_preprocess"] and result["models"][files[0]]["agreement"] == 1.0
    assert main(["bench", *files, "--select"]) == 2
    assert "--select needs a run folder" in capsys.readouterr().err


def test_a_failing_int8_candidate_is_reported_not_fatal(smoke_run, tmp_path, monkeypatch):
    from distiller.runfolder import Run
    from distiller.pipeline import export_run
    from exporter.variants import Variant

    def boom(ctx):
        raise AttributeError("'NoneType' object has no attribute 'data_type'")
    monkeypatch.setitem(VARIANTS._items, "onnx-int8-broken", Variant("x.onnx", "onnx", "int8", ("onnx-fp32",), boom))
    run = _copy_run(smoke_run, tmp_path, latency_runs=3, variants=["onnx-fp32", "onnx-int8-broken"])
    report = export_run(Run(run))
    assert report["export"]["failed"] == {"onnx-int8-broken": "AttributeError: 'NoneType' object has no attribute 'data_type'"}
    assert report["deployable"] == "student.onnx"
    assert any("onnx-int8-broken: failed to build" in n for n in report["export"]["notes"])
