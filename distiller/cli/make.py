"""``make`` and the single-stage commands ``synthesize``, ``distill``, ``export``."""
from __future__ import annotations

import os
import re
import time
import unicodedata
from pathlib import Path
from typing import List, Optional

import typer

from runtime.openset import OpenSetRule

from ..openset import describe_rule
from ..recipe import load_recipe
from ..runfolder import RunPaths
from . import app
from .ui import RichReporter, artifacts_table, console, err, literal

RUN_ARG = typer.Argument(..., help="A run folder made by `distiller make`.", show_default=False)
IMAGES = typer.Option(None, "--images", help="A folder of your own unlabelled images (read recursively; repeatable): "
                      "the teacher labels them and the student learns from them beside the surrogates.")
VERBOSE = typer.Option(False, "--verbose", help="Let third-party tools (ONNX Runtime, NNCF, OpenVINO) print their logs.")


def _slug(labels: list[str]) -> str:
    """A readable folder name from the labels, in any script: letters and digits kept, symbols (emoji)
    spelt by their Unicode names, everything else a dash (``猫,🐶`` -> ``猫-dog-face``)."""
    parts = []
    for ch in "-".join(labels).lower():
        if ch.isalnum() and ch.isprintable():
            parts.append(ch)
        elif unicodedata.category(ch).startswith("S") and unicodedata.name(ch, ""):
            parts.append("-" + unicodedata.name(ch).lower().replace(" ", "-") + "-")
        else:
            parts.append("-")
    s = re.sub(r"-+", "-", "".join(parts)).strip("-")
    return s[:48].rstrip("-") or "run"


def _set_env(offline: bool, verbose: bool = False) -> None:
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"   # before open_clip / huggingface_hub are imported
    if verbose:
        os.environ["DISTILLER_VERBOSE"] = "1"


@app.command()
def make(
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="Comma-separated class names; label=teacher text, and label=@DIR (a class by example images) allowed."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="A file with one class per line."),
    target: Optional[str] = typer.Option(None, help="Deployment target: picks the student (cpu, cpu-large, tiny)."),
    recipe: str = typer.Option("auto", "--recipe", "-r", help="Recipe name (see `distiller recipes`) or .toml path; "
                               "auto: cpu-imagenet for ImageNet teachers, else cpu."),
    teacher: Optional[str] = typer.Option(None, help="open_clip model name (ViT-B-32), model-config .json path, "
                                          "efficientnet-lite0|1|2 (offline ImageNet teachers) or timm:NAME."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag, or a local weights file."),
    prompts: Optional[str] = typer.Option(None, help="Prompt source: auto (contrastive for CLIP), contrastive, random, mix, plain."),
    styles: Optional[int] = typer.Option(None, help="Number of prompt styles."),
    student_init: Optional[str] = typer.Option(None, "--student-init", help="scratch, or pretrained (an ImageNet backbone)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    seed: Optional[int] = typer.Option(None, help="Seed for synthesis and training."),
    out: Path = typer.Option(Path("runs"), help="Parent folder of run folders."),
    name: Optional[str] = typer.Option(None, help="Run folder name; default from the classes."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Overwrite a finished run of the same name."),
    offline: bool = typer.Option(False, "--offline", help="Never reach a model hub; fail fast on missing weights."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Start even above synthesis.confirm_above planned images."),
    images: Optional[List[Path]] = IMAGES,
    other_label: Optional[str] = typer.Option(None, "--other-label", help="Name of the open-set answer for images of "
                                              "none of the classes (default: other; --set openset=false: none)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any recipe key: --set synthesis.steps=200"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    verbose: bool = VERBOSE,
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (torchrun): they share the "
                              "synthesis; see the README for several machines."),
):
    """Class names in, deployable CPU classifier out: synthesize, distill, quantize, export."""
    from ..ranks import world
    if nproc > 1 and world().size == 1:
        raise typer.Exit(_torchrun(nproc))
    _set_env(offline, verbose)

    from ..concepts import parse_concepts
    from ..recipe import load_recipe, parse_set
    concepts = parse_concepts(classes, classes_file)
    overrides = {"target": target, "teacher.model": teacher, "teacher.pretrained": pretrained,
                 "prompts.source": prompts, "prompts.styles": styles, "device": device, "seed": seed,
                 "student.init": student_init, "other_label": other_label}
    overrides.update(parse_set(set_ or []))
    if recipe == "auto":
        from ..teachers import auto_recipe
        recipe = auto_recipe(overrides.get("teacher.model"))   # --teacher or --set teacher.model=
    rec = load_recipe(recipe, overrides)
    from ..pipeline import check_out
    from ..pipeline import make as make_run
    run_dir = check_out(out, name if name is not None else _slug([c.label for c in concepts]))
    image_set = None
    if images:
        from ..images import scan_images
        image_set = scan_images(images, rec.seed, rec.images.val_fraction)
    main_rank = world().main
    quiet = quiet or not main_rank   # one display: rank 0's
    reporter = RichReporter(quiet)
    if not quiet:
        err.print(f"[bold]distiller make[/bold] {literal(', '.join(c.label for c in concepts))} -> {literal(run_dir)} "
                  f"(recipe {literal(rec.name)}, target {rec.target}, teacher {literal(rec.teacher.model)})", highlight=False)
    t0 = time.perf_counter()
    report = make_run(run_dir, rec, concepts, reporter, exist_ok=exist_ok, offline=offline, yes=yes, images=image_set)
    if report is not None:   # rank 0 (the other ranks leave once the student is trained)
        _summary(run_dir, report, time.perf_counter() - t0)


def _torchrun(nproc: int) -> int:
    """`make --nproc N`: the same command under torchrun on this machine, N processes; its exit code."""
    import subprocess
    import sys

    from . import ARGS
    args, skip = [], False
    for a in ARGS:   # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "distiller",
           *args]
    return subprocess.call(cmd)


def _summary(run_dir: Path, report: dict, seconds: float) -> None:
    console.print(artifacts_table(report))
    ts, st = report.get("transfer_set") or {}, report["student"]
    if ts.get("real") or ts.get("skipped"):
        console.print(f"transfer set: surrogate: {ts['surrogate']}, real: {ts['real']} "
                      f"({ts.get('real_val', 0)} held back for validation), skipped: {len(ts['skipped'])}")
        for s in ts["skipped"][:SKIPPED_SHOWN]:
            console.print(f"  skipped {literal(s['path'])}: {literal(s['reason'])}", highlight=False)
        if len(ts["skipped"]) > SKIPPED_SHOWN:
            console.print(f"  ... and {len(ts['skipped']) - SKIPPED_SHOWN} more (report.json lists every one)")
    agree = [f"[bold]real {100 * st['val_agreement_real']:.1f}%[/bold] (the number to trust)"] if "val_agreement_real" in st else []
    if "val_agreement_judge" in st:
        agree.append(f"judge-confirmed surrogate {100 * st['val_agreement_judge']:.1f}%")
    if "val_agreement_surrogate" in st:
        agree.append(f"surrogate {100 * st['val_agreement_surrogate']:.1f}%")
    if agree:
        console.print(f"student agrees with the teacher on held-back images: {', '.join(agree)} "
                      f"(epoch {st.get('best_epoch', '?')} of {st['epochs']})")
    if st.get("selection"):
        what = "as initialised" if st.get("best_epoch") == 0 else f"epoch {st['best_epoch']}"
        console.print(f"shipped {what}, chosen on {st['selection']}", highlight=False)
    heads = st.get("head")
    if isinstance(heads, dict) and st.get("init") == "pretrained":
        console.print("student heads: " + "; ".join(_head_line(k, h) for k, h in heads.items()), highlight=False)
    j = report.get("judge")
    if j:
        low = {k: v for k, v in j["per_concept"].items() if v < j["min"]}
        if j.get("self_judged"):
            console.print(f"[yellow]{literal(', '.join(j['self_judged']))}: judged by the teacher itself (held-out templates): "
                          f"weaker, the teacher grades its own images[/yellow]")
        console.print(f"held-out judge {j['judge']} on the bank: " + ", ".join(
            f"{'[bold red]' if k in low else ''}{literal(k)} {100 * v:.0f}%{'[/bold red]' if k in low else ''}" for k, v in j["per_concept"].items())
            + (f"  ([bold red]below {100 * j['min']:.0f}%: may not transfer[/bold red])" if low else ""))
    t = report.get("timings_s", {})
    console.print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()) + f"; this call {seconds:.0f}s")
    console.print(f"report [bold]{literal(run_dir / 'report.html')}[/bold] (open it in a browser: images, plots, every variant)")
    console.print(f"ship [bold]{literal(run_dir / report['deployable'])}[/bold] (all numbers: {literal(run_dir / 'report.json')})")
    rule = report.get("export", {}).get("open_set")
    if rule:
        rec = load_recipe(str(RunPaths(run_dir).recipe))
        console.print(literal(describe_rule(OpenSetRule.from_json(rule), rec.other_label, rec.other_bias, str(run_dir))),
                      highlight=False)
    console.print("next:\n"
                  f"  distiller predict {literal(run_dir)} IMAGE...\n"
                  f"  distiller eval {literal(run_dir)} --data DIR\n"
                  f"  python -c \"from runtime import Classifier; print(Classifier.load('{literal(run_dir)}').classify('IMAGE'))\"")


SKIPPED_SHOWN = 20


def _head_line(label: str, h: dict) -> str:
    if h["source"] == "fresh":
        return f"{literal(label)} fresh (learnt)"
    if h["source"] == "examples":
        return f"{literal(label)} examples ({h.get('examples', 0)} images)"
    shown = ", ".join(h["classes"][:3]) + (f", +{len(h['classes']) - 3}" if len(h["classes"]) > 3 else "")
    return f"{literal(label)} {h['source']} ({literal(shown)})"


def _lock(path: Path) -> None:
    """This command writes ``path``: it holds the run folder's writer lock until the command ends."""
    from ..runfolder import writer_lock
    from . import HELD
    HELD.enter_context(writer_lock(path))


def _run(path: Path, device: Optional[str] = None, offline: bool = False, quiet: bool = False, verbose: bool = False):
    _set_env(offline, verbose)
    from ..ranks import world
    from ..runfolder import Run
    if world().main:
        _lock(path)
    return Run(path, RichReporter(quiet or not world().main), device=device, offline=offline)   # one display: rank 0's


@app.command()
def synthesize(run: Path = RUN_ARG, device: Optional[str] = typer.Option(None), offline: bool = typer.Option(False, "--offline"),
               images: Optional[List[Path]] = IMAGES,
               quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = VERBOSE):
    """Fill (or finish) a run's surrogate image bank; --images DIR adds your own images to it."""
    from .. import ranks
    from ..pipeline import run_stages
    from ..stages import stage_group
    r = _run(run, device, offline, quiet, verbose)
    with ranks.group(r.device) as w:   # under torchrun: the ranks share the shards, as in make
        if images and w.main:
            from ..images import add_images
            added = add_images(r, images)
            r.reporter.log(f"{len(added.files)} images to label, {len(added.skipped)} skipped")
            for s in added.skipped[:SKIPPED_SHOWN]:
                r.reporter.log(f"  skipped {s['path']}: {s['reason']}")
        ranks.barrier("the images added")
        run_stages(r, stage_group("synthesize"))


@app.command()
def distill(run: Path = RUN_ARG, device: Optional[str] = typer.Option(None), offline: bool = typer.Option(False, "--offline"),
            quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = VERBOSE):
    """Train (or resume training) a run's student on its bank."""
    from ..pipeline import run_stages
    from ..ranks import group
    from ..stages import stage_group
    r = _run(run, device, offline, quiet, verbose)
    with group(r.device):   # under torchrun: DistributedDataParallel, as in make
        run_stages(r, stage_group("distill"))


@app.command()
def export(run: Path = RUN_ARG, quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = VERBOSE):
    """Export a run's student to ONNX / OpenVINO, FP32 and INT8, and pick the deployable one."""
    from ..pipeline import export_run
    t0 = time.perf_counter()
    report = export_run(_run(run, "cpu", quiet=quiet, verbose=verbose))
    _summary(run, report, time.perf_counter() - t0)


@app.command()
def report(run: Path = RUN_ARG, open_: bool = typer.Option(False, "--open", help="Open report.html in a browser where there is one.")):
    """Write a run's report.html again (picks up `distiller eval` results saved since)."""
    from ..runfolder import Run
    from ..stages.html import write_html
    _lock(run)
    r = Run(run, device="cpu")
    write_html(r)
    console.print(f"report [bold]{literal(r.paths.html)}[/bold] ({r.paths.html.stat().st_size / 1e6:.2f} MB)")
    if open_:
        import webbrowser
        try:
            webbrowser.get()
        except webbrowser.Error:
            err.print("no browser found here: open the file on a machine with one (it is self-contained)")
            return
        webbrowser.open(r.paths.html.resolve().as_uri())
