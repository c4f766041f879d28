"""Deployment numbers for one run: `distiller bench` on it, plus the ratios users ask about.

    python benchmarks/bench_cpu.py runs/cats-dogs          # any finished run

Prints the bench table and: teacher image tower (ONNX FP32) vs the deployable student at batch 1,
the deployable variant vs plain ONNX Runtime FP32, INT8 vs the FP32 it replaces, and the overhead
of `Classifier.classify` on a 224 px image over a bare session run on the preprocessed tensor.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



from distiller.bench import bench_run, classify_overhead, teacher_baseline, val_images  # noqa: E402
from distiller.cli.models import bench_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    result = bench_run(args.run, args.threads, args.runs, 20, 32)
    result["teacher"] = teacher_baseline(args.run, args.threads)
    report = json.loads((args.run / "report.json").read_text())
    dep = report["export"]["deployable_variant"]
    rows = result["models"]
    p50 = {n: r["latency_ms"]["p50"] for n, r in rows.items()}
    ratios = {"deployable": dep, "deployable_p50_ms": p50[dep], "onnx_fp32_p50_ms": p50["onnx-fp32"],
              "deployable_vs_onnx_fp32": p50["onnx-fp32"] / p50[dep]}
    if result["teacher"]:
        ratios["teacher_p50_ms"] = result["teacher"]["latency_ms"]["p50"]
        ratios["teacher_vs_deployable"] = ratios["teacher_p50_ms"] / p50[dep]
    info = report.get("teacher") or {}
    if info.get("family") == "imagenet":   # also the teacher at its own size (the run may use a smaller one)
        native = teacher_baseline(args.run, args.threads, input_size=0)
        if native["input_size"] != result["teacher"]["input_size"]:
            ratios[f"teacher_{native['input_size']}px_p50_ms"] = native["latency_ms"]["p50"]
            ratios[f"teacher_{native['input_size']}px_vs_deployable"] = native["latency_ms"]["p50"] / p50[dep]
    if rows[dep]["precision"] == "int8":
        fp32 = "openvino-fp32" if dep.startswith("openvino") else "onnx-fp32"
        ratios["int8_vs_its_fp32"] = p50[fp32] / p50[dep]
    images, _ = val_images(args.run)
    ratios["classify_overhead"] = classify_overhead(Path(rows[dep]["file"]), images[0], args.threads)
    ratios["deployable_agreement_fp32"] = report["export"]["variants"][dep]["agreement"]
    ratios["deployable_agreement_teacher"] = report["export"]["variants"][dep]["teacher_agreement"]
    if args.json:
        print(json.dumps({"bench": result, "ratios": ratios}, indent=1))
        return 0
    from distiller.cli.ui import console as con
    con.print(bench_table(result))
    for k, v in ratios.items():
        con.print(f"{k:32s} {v if not isinstance(v, float) else round(v, 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
