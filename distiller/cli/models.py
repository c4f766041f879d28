"""Commands that use exported models: ``predict`` and ``eval``. They need only the runtime install."""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from runtime.errors import UserError

from . import app
from .ui import console, err, eval_table, fit_table, literal, rejection_table


def expand_images(items: list[str]) -> list[Path]:
    from runtime.preprocess import IMAGE_SUFFIXES, list_images
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif p.exists():
            out.append(p)
        else:
            hits = sorted(Path(h) for h in glob.glob(item, recursive=True) if Path(h).suffix.lower() in IMAGE_SUFFIXES)
            if not hits:
                raise UserError(f"{item}: no such file, folder or matching images")
            out += hits
    return out


@app.command()
def predict(
    model: str = typer.Argument(..., help="A model file (.onnx, .xml) or a run folder."),
    images: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, help="How many labels to show per image."),
    as_json: bool = typer.Option(False, "--json", help="JSON Lines on stdout, one per image, streamed as they come."),
    backend: str = typer.Option("auto", help="auto, onnxruntime or openvino."),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads; default: physical cores."),
    batch: int = typer.Option(16, min=1, help="Images per model call."),
    exact: bool = typer.Option(False, "--exact", help="The exact torchvision-equivalent preprocessing (no JPEG draft decoding)."),
    open_set: Optional[bool] = typer.Option(None, "--open-set/--closed-set", help="Answer the model's other label by "
                                            "its rule, or never (default: as the model's rule says; docs/open-set.md)."),
):
    """Classify images with an exported model (any number: streamed in bounded memory)."""
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from runtime import Classifier
    clf = Classifier.load(model, backend=backend, threads=threads, exact=exact)
    paths = expand_images(images)
    table = Table(title=f"{literal(clf.path)} ({clf.backend})", title_justify="left")
    for c in ("image", "label", "probability"):
        table.add_column(c)
    failed = 0
    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                   transient=True) if err.is_terminal else nullcontext()
    with bar:
        task = bar.add_task("predict", total=len(paths)) if err.is_terminal else None
        for p, result in zip(paths, clf.classify_iter(paths, top_k=top_k, batch_size=batch, errors="return",
                                                                 open_set=open_set)):
            if task is not None:
                bar.advance(task)
            if isinstance(result, UserError):
                failed += 1
                err.print(f"[yellow]skipped[/yellow] {literal(result)}", highlight=False)
                continue
            if as_json:
                sys.stdout.write(json.dumps({"image": str(p), "top": [{"label": lab, "probability": round(pr, 6)}
                                                                      for lab, pr in result]}) + "\n")
                sys.stdout.flush()
            else:
                table.add_row(literal(p), literal(result[0][0]), f"{result[0][1]:.3f}", end_section=False)
                for lab, pr in result[1:]:
                    table.add_row("", f"[dim]{literal(lab)}[/dim]", f"[dim]{pr:.3f}[/dim]")
    if not as_json:
        console.print(table)
    if failed:
        err.print(f"[yellow]{failed} of {len(paths)} images skipped[/yellow] (reasons above)", highlight=False)
    if failed == len(paths):
        raise UserError("none of the images could be read")


@app.command(name="eval")
def evaluate(
    model: str = typer.Argument(..., help="A model file or a run folder (then every exported variant is scored)."),
    data: Path = typer.Option(..., "--data", help="ImageFolder tree: DIR/label/* or DIR/domain/label/*."),
    labels_map: Optional[Path] = typer.Option(None, "--labels-map", help="folder=label lines (or JSON) for folder names that differ."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also score the run's teacher (needs the train install)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also score the free baseline: EfficientNet-Lite0's "
                                  "own ImageNet head restricted to the run's classes at 128 px (train install)."),
    offline: bool = typer.Option(False, "--offline"),
    other_data: Optional[Path] = typer.Option(None, "--other-data", help="A folder of images of none of the classes: "
                                              "scores rejection (AUROC of known against other, and how often "
                                              "'other' is answered)."),
    fit: bool = typer.Option(False, "--fit", help="Fit the open-set threshold on these photos (a run folder, with "
                             "--other-data): it keeps --keep of the known images, is written into every variant and "
                             "turns the open-set answer on."),
    keep: float = typer.Option(0.95, "--keep", help="With --fit: the share of known images the threshold keeps."),
    score: Optional[str] = typer.Option(None, "--score", help="With --fit: the open-set score to threshold: "
                                        "margin (default), max_logit, max_softmax, energy."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Accuracy on real labelled images, per domain, with Wilson 95% intervals (--other-data: rejection too)."""
    from ..evaluation import evaluate_models, read_labels_map, save_eval, training_overlap
    from ..fitting import fit_run
    fits = fit_run(Path(model), data, other_data, keep, score, read_labels_map(labels_map)) if fit else {}
    fitted = {f: v.to_json() for f, v in fits.items()}
    dataset, results, notes = evaluate_models(Path(model), data, read_labels_map(labels_map), teacher, baseline, offline,
                                              other_data)
    overlap = training_overlap(Path(model), dataset)
    warning = (f"[bold red]warning: {len(overlap)} of the {len(dataset.samples)} images in {literal(data)} are among "
               f"the run's own --images or example images (same content), e.g. {literal(overlap[0])}: the student and the teacher's labels "
               f"were made on them, so a score here is not an accuracy. Evaluate on images the run never saw.[/bold red]"
               ) if overlap else None
    if Path(model).is_dir():   # a run folder keeps its latest eval for `distiller report`
        save_eval(Path(model), dataset, results, notes, overlap, fitted)
    if as_json:
        if warning:
            err.print(warning)
        sys.stdout.write(json.dumps({"data": str(data), "labels": dataset.labels, "results": results,
                                     "training_overlap": len(overlap),
                                     "open_set_fit": fitted}) + "\n")
        return
    console.print(eval_table(f"{data}: {len(dataset.samples)} images, labels {', '.join(dataset.labels)}", results))
    if other_data is not None:
        console.print(rejection_table(f"{other_data}: images of none of the classes", results))
    if fits:
        console.print(fit_table(f"open-set threshold fitted on {data} and {other_data} (keep {keep:g}), written into "
                                "every variant", fits))
    if warning:   # after the table, where it is read
        err.print(warning)
    for note in notes:
        err.print(f"[dim]{literal(note)}[/dim]")
    first = next(iter(results.values()))
    if first["skipped_folders"]:
        err.print(f"[yellow]skipped folders matching no label:[/yellow] {literal(', '.join(first['skipped_folders']))} (use --labels-map)")
    if first["unreadable"]:
        err.print(f"[yellow]unreadable images skipped:[/yellow] {len(first['unreadable'])}")


@app.command()
def bench(
    models: List[str] = typer.Argument(..., help="A run folder, or model files (.onnx, .xml)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads; default: physical cores."),
    runs: int = typer.Option(100, min=1, help="Timed batch-1 runs per model."),
    warmup: int = typer.Option(10, min=0, help="Untimed runs first."),
    batch: int = typer.Option(32, min=1, help="Batch size for the throughput figure."),
    include_preprocess: bool = typer.Option(False, "--include-preprocess", help="Time the whole classify() call on a 224 px image."),
    e2e: Optional[Path] = typer.Option(None, "--e2e", help="A folder of your own images: end-to-end images per second "
                                       "(decode, resize, model) beside the model-only figure."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="For a run: also time the teacher's image tower (ONNX FP32)."),
    select: bool = typer.Option(False, "--select", help="For a run: rewrite report.json's deployable variant for this machine."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Latency (p50/p90/p99 at batch 1), throughput and agreement of each variant, on this machine."""
    from ..bench import bench_models, bench_run, select_for_device, teacher_baseline
    from ..runfolder import RunPaths
    first = Path(models[0])
    is_run = len(models) == 1 and first.is_dir()
    if is_run:
        if not RunPaths(first).report.exists():
            raise UserError(f"{first}: no report.json: pass a finished run folder or model files")
        result = bench_run(first, threads, runs, warmup, batch, include_preprocess)
        if teacher:
            result["teacher"] = teacher_baseline(first, threads)
    else:
        if select:
            raise UserError("--select needs a run folder (it rewrites its report.json)")
        paths = {m: Path(m) for m in models}
        images = _images_for(paths)
        result = bench_models(paths, images, None, threads, runs, warmup, batch, include_preprocess)
    if select:
        report = select_for_device(first, result)
        result["deployable"] = report["deployable"]
    if e2e is not None:
        from ..bench import end_to_end
        target = first if is_run else paths[models[0]]
        result["e2e"] = end_to_end(target, e2e, threads, batch)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console.print(bench_table(result))
    for name, why in result.get("skipped", {}).items():
        err.print(f"[yellow]skipped[/yellow] {literal(name)}: {literal(why)}", highlight=False)
    if result.get("deployable"):
        console.print(f"deployable on this machine: [bold]{literal(result['deployable'])}[/bold] (report.json updated)")
    if result.get("e2e"):
        e = result["e2e"]
        console.print(f"end to end on {e['images']} images from {literal(e['folder'])} ({literal(e['model'])}): "
                      f"[bold]{e['e2e_ips']:.1f} img/s[/bold] ({e['ms_per_image']:.2f} ms per image: decode, resize, model; "
                      f"batch {e['batch']}, {e['workers']} decode threads); model only: {e['model_ips']:.1f} img/s"
                      + (f"; {e['skipped']} unreadable skipped" if e["skipped"] else ""))


def _images_for(paths: dict) -> list:
    """Inputs for bare model files: deterministic noise images at each model's own size."""
    import numpy as np

    from runtime import Classifier
    size = Classifier.load(next(iter(paths.values()))).metadata.preprocess.resize
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(16)]


def bench_table(result: dict) -> Table:
    title = (f"bench: {result['cpu']}, {result['threads']} threads, {result['runs']} runs after {result['warmup']} warm-up"
             f"{', classify() incl. preprocessing' if result['include_preprocess'] else ''}; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    t = Table(title=title, title_justify="left")
    t.add_column("model", no_wrap=True)
    for c in ("format", "precision", "MB", "vs FP32", "vs teacher", "p50 ms", "p90 ms", "p99 ms", "img/s @batch"):
        t.add_column(c, justify="right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for name, r in result["models"].items():
        lat = r["latency_ms"]
        t.add_row(literal(name), r["format"], r["precision"], f"{r['size_mb']:.1f}", pct(r["agreement"]), pct(r["teacher_agreement"]),
                  f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r['throughput_ips']:.0f} @{r['batch']}")
    tb = result.get("teacher")
    if tb:
        lat = tb["latency_ms"]
        t.add_row(f"teacher {tb['model']}", "onnxruntime", "fp32", f"{tb['size_mb']:.1f}", "", "", f"{lat['p50']:.2f}",
                  f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", "")
    return t
