"""``report.html``: everything a run made, in one self-contained page a user can look at.

Images and plots are embedded as data URIs (JPEG thumbnails, matplotlib PNG plots through the Agg
backend); nothing points outside the file (no remote ``src``/``href``, no ``@import``, no remote
``url(...)``), so it reads offline and as an e-mail attachment, without JavaScript. Every section
reads its stage's artefacts through that stage's API; sections whose stage did not run are left out.
"""
from __future__ import annotations

import base64
import html
import io
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from runtime.atomic import read_json
from runtime.exports import ExportRecord
from runtime.openset import OpenSetRule

from . import __version__
from .bank import Bank
from .images import real_images, square
from .openset import describe_rule
from .runfolder import Run

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #d5d9e0}
section{background:#fff;border-radius:8px;padding:4px 16px 12px;margin:12px 0;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;width:100%;font-size:.92em;display:block;overflow-x:auto}
th,td{padding:4px 8px;border-bottom:1px solid #e4e7ec;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
img{max-width:100%;height:auto}.warn{color:#8a4b00}.bad{color:#b00020;font-weight:600}.ok{color:#116b2c;font-weight:600}
.meta{color:#586074}pre{overflow-x:auto;background:#f0f2f5;padding:8px;font-size:.85em}
.verdict{font-size:1.1em}figure{margin:8px 0}figcaption{color:#586074;font-size:.9em}
"""


def _e(x) -> str:
    return html.escape(str(x))


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img src="{data_uri(data, mime)}" alt="{_e(alt)}">'


def _plot(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def class_grid(images: np.ndarray, recs: list[dict], cls: int, per_row: int = 6, tile: int = 72) -> bytes | None:
    """One JPEG per class: a row of thumbnails per style (at most 8 styles)."""
    from PIL import Image, ImageDraw
    rows: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        if r["class"] == cls:
            rows.setdefault(r["style"], []).append(i)
    if not rows:
        return None
    styles = sorted(rows)[:8]
    label_w = 110
    sheet = Image.new("RGB", (label_w + per_row * tile, len(styles) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for y, s in enumerate(styles):
        draw.text((4, y * tile + 4), str(recs[rows[s][0]]["style_name"])[:16], fill="black")
        for x, i in enumerate(rows[s][:per_row]):
            sheet.paste(Image.fromarray(np.asarray(images[i])).resize((tile, tile), Image.BILINEAR), (label_w + x * tile, y * tile))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _judge_chart(judge: dict) -> bytes:
    plt = _pyplot()
    labels, vals = list(judge["per_concept"]), [100 * v for v in judge["per_concept"].values()]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    colors = ["#b00020" if v < 100 * judge["min"] else "#2d6cdf" for v in vals]
    ax.barh(labels, vals, color=colors)
    ax.axvline(100 * judge["min"], color="#8a4b00", ls="--", label=f"judge_min {100 * judge['min']:.0f}%")
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{judge['judge']} sees the intended class (% of its surrogate images)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    return _plot(fig)


def _training_chart(history: list[dict], chosen: int) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ep = [h["epoch"] for h in history]
    for key, name, color in (("val_agreement_real", "real images", "#1b7f3b"), ("val_agreement_judge", "judge-confirmed images",
                             "#8a4b00"), ("val_agreement_surrogate", "surrogate images", "#999999")):
        if key in history[-1] and history[-1].get("selected_on") != "surrogate":
            ax.plot(ep, [100 * h.get(key, np.nan) for h in history], marker=".", color=color, label=name)
    ax.plot(ep, [100 * h["val_agreement"] for h in history], marker="o", color="#2d6cdf",
            label=f"selected on ({history[-1].get('selected_on', 'surrogate')})")
    best = next(h for h in history if h["epoch"] == chosen)
    ax.scatter([chosen], [100 * best["val_agreement"]], s=160, facecolors="none", edgecolors="#b00020", linewidths=2,
               label=f"chosen: epoch {chosen}")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(ep) + 0.5)
    ax.set_xlabel("epoch (0: the student as initialised)")
    ax.set_ylabel("val agreement with the teacher (%)")
    ax.set_ylim(0, 102)
    ax.legend(loc="lower right")
    return _plot(fig)


def _latency_chart(variants: dict, teacher: dict | None) -> bytes:
    plt = _pyplot()
    names = list(variants) + (["teacher"] if teacher else [])
    p50 = [r.latency_ms.p50 for r in variants.values()] + ([teacher["latency_ms"]["p50"]] if teacher else [])
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(names) + 1.2))
    colors = ["#116b2c" if r.eligible else "#9aa3b2" for r in variants.values()] + (["#8a4b00"] if teacher else [])
    ax.barh(names, p50, color=colors)
    for i, v in enumerate(p50):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("batch-1 latency p50 (ms, this machine)")
    ax.invert_yaxis()
    return _plot(fig)


def _accuracy_chart(ev: dict) -> bytes:
    plt = _pyplot()
    models = list(ev["results"])
    domains = [r["domain"] for r in ev["results"][models[0]]["rows"]]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        rows = {r["domain"]: r for r in ev["results"][m]["rows"]}
        vals = [100 * rows[d]["balanced_accuracy"] for d in domains]
        lo = [v - 100 * rows[d]["balanced_ci"][0] for v, d in zip(vals, domains)]
        hi = [100 * rows[d]["balanced_ci"][1] - v for v, d in zip(vals, domains)]
        ax.bar(np.arange(len(domains)) + j * width, vals, width, yerr=[lo, hi], capsize=2, label=m[:40])
    ax.set_xticks(np.arange(len(domains)) + width * (len(models) - 1) / 2, domains)
    ax.set_ylabel("balanced accuracy (%), Wilson 95%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1, 1))
    return _plot(fig)


@dataclass
class Page:
    """What the page shows, each part read through its stage's API by the report.html stage."""
    run: Run
    report: dict                       # report.json
    export: ExportRecord
    history: list[dict]                # the distill stage's per-epoch history
    judge: dict | None                 # the judge stage's verdict
    teacher_latency: dict | None       # the teacher's tower timed once (ONNX FP32)


def render(page: Page) -> str:
    """The page for a finished run."""
    report = page.report
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    teacher, student = report["teacher"], report["student"]
    parts = [f"<h1>distiller: {_e(', '.join(report['labels']))}</h1>",
             f"<p class=meta>teacher {_e(teacher.get('model'))} ({_e(teacher.get('family', '?'))}, weights "
             f"{_e(teacher.get('weights', '-'))}); student {_e(student['model'])} @ {student['input_size']} px; recipe "
             f"{_e(report['recipe'])}; distiller {__version__}, Python {platform.python_version()}; written {now}</p>"]
    for section in (_verdict, _concepts, _surrogates, _your_images, _training, _deployment, _accuracy, _timings):
        parts.append(section(page))
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,"
            f"initial-scale=1\"><title>distiller: {_e(', '.join(report['labels']))}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def _verdict(page: Page) -> str:
    exp, tl = page.export, page.teacher_latency
    dep = exp.variants[exp.deployable_variant]
    speed = (f", {tl['latency_ms']['p50'] / dep.latency_ms.p50:.1f}x faster than the teacher "
             f"({tl['latency_ms']['p50']:.2f} ms, ONNX FP32 on this machine)") if tl else ""
    warns = list(dict.fromkeys(page.run.warnings() + list(exp.notes)))   # the run's own, and export's
    verdict = [f"<p class=verdict>Ship <b>{_e(page.report['deployable'])}</b> ({_e(dep.precision)}, {dep.size_mb:.1f} MB): "
               f"p50 {dep.latency_ms.p50:.2f} ms at batch 1{speed}; agreement with FP32 {_pct(dep.agreement)}, "
               f"with the teacher {_pct(dep.teacher_agreement)} on the "
               f"{'real' if exp.calibration_source == 'real' else 'bank' + chr(39) + 's'} validation images.</p>"]
    verdict.append("<ul>" + "".join(f"<li class=warn>{_e(w)}</li>" for w in warns) + "</ul>" if warns
                   else "<p class=ok>No warnings.</p>")
    return "<section><h2>Verdict</h2>" + "".join(verdict) + "</section>"


def _concepts(page: Page) -> str:
    run, student = page.run, page.report["student"]
    members = (read_json(run.paths.teacher) or {}).get("concepts", {})
    heads = student.get("head") if student.get("init") == "pretrained" and isinstance(student.get("head"), dict) else {}
    rows = []
    for c in run.concepts:
        m, h = members.get(c.label), heads.get(c.label)
        pooled = "-" if not h or not h["classes"] else _e(", ".join(h["classes"][:6]) + (
            f", +{len(h['classes']) - 6}" if len(h["classes"]) > 6 else ""))
        rows.append([_e(c.label), _e(c.text), _e(m[0]) if m else "-", str(len(m[1])) if m else "-",
                     _e(h["source"]) if h else "-", pooled])
    return ("<section><h2>Concepts</h2>" + _table(["label", "teacher reads", "WordNet synset", "ImageNet classes",
                                                   "student head", "its ImageNet rows"], rows) + _examples(run)
            + "<p class=meta>A CLIP teacher reads the text through its prompt templates; an ImageNet teacher scores a "
            "concept as the logsumexp of the classes beneath it. The student's head per concept: wordnet (its own "
            "rows for the WordNet classes), clip (rows of the ImageNet classes the CLIP text tower found near it, "
            "weighted), examples (a probe on its own features of the example images) or fresh (a new row, "
            "learnt).</p></section>")


def _examples(run: Run) -> str:
    """Thumbnails of each concept by example's images (six a row), as the run folder keeps them."""
    figs = []
    for c in run.concepts:
        paths = [p for p in c.examples if Path(p).is_file()][:48]
        if paths:
            recs = [{"class": 0, "style": i // 6, "style_name": "examples" if i < 6 else ""} for i in range(len(paths))]
            grid = class_grid(np.stack([square(p, 72) for p in paths]), recs, 0)
            figs.append(f"<figure>{_img(grid, 'image/jpeg', f'example images of {c.label}')}<figcaption>{_e(c.label)}: "
                        f"defined by {len(c.examples)} example image{'s' if len(c.examples) > 1 else ''}</figcaption>"
                        "</figure>")
    return "".join(figs)


def _surrogates(page: Page) -> str:
    bank = Bank(page.run.paths.bank)
    imgs, _, recs = bank.load()
    sec = [f"<p class=meta>{len(recs)} surrogate images, {bank.count('val')} of them held out for validation.</p>"]
    for k, c in enumerate(page.run.concepts):
        grid = class_grid(imgs, recs, k)
        if grid:
            sec.append(f"<figure>{_img(grid, 'image/jpeg', f'surrogate images of {c.label}')}"
                       f"<figcaption>{_e(c.label)}: a row per style</figcaption></figure>")
    judge = page.judge
    if judge:
        sec.append(f"<figure>{_img(_judge_chart(judge), 'image/png', 'held-out judge per concept')}<figcaption>the held-out "
                   f"judge {_e(judge['judge'])}, a network that took no part in making the bank: concepts under the "
                   "dashed line may not transfer to real images</figcaption></figure>")
    else:
        sec.append("<p class=meta>No held-out judge for this run (teacher.judge = none, or no network left to judge): "
                   "read the student's real-image accuracy with <code>distiller eval</code>.</p>")
    return "<section><h2>Surrogate images</h2>" + "".join(sec) + "</section>"


def _your_images(page: Page) -> str:
    """The user's own images (--images), as the teacher labelled them, and every file skipped."""
    ts = page.report.get("transfer_set") or {}
    if not (ts.get("real") or ts.get("skipped")):
        return ""
    rimgs, rlogits, _ = real_images(page.run).load()
    sec = [f"<p class=meta>{ts['real']} unlabelled images of your own, labelled by the teacher ({ts.get('real_val', 0)} "
           f"held back for validation: the agreement to trust), beside {ts['surrogate']} surrogate images. INT8 "
           f"calibration: {_e(page.export.calibration_source or 'surrogate')} images.</p>"]
    if len(rimgs):
        pseudo = [{"class": int(k), "style": 0, "style_name": "yours"} for k in rlogits.argmax(1)]
        for k, c in enumerate(page.run.concepts):
            grid = class_grid(rimgs, pseudo, k)
            if grid:
                sec.append(f"<figure>{_img(grid, 'image/jpeg', f'your images the teacher calls {c.label}')}"
                           f"<figcaption>the teacher calls these {_e(c.label)}</figcaption></figure>")
    if ts.get("skipped"):
        sec.append(_table(["skipped file", "why"], [[_e(x["path"]), _e(x["reason"])] for x in ts["skipped"]]))
    return "<section><h2>Your images</h2>" + "".join(sec) + "</section>"


def _training(page: Page) -> str:
    history, student = page.history, page.report["student"]
    chosen = max(history, key=lambda h: h["val_agreement"])["epoch"]   # the first best, as best.pt keeps it
    why = ("the student as initialised scored best: it ships unchanged" if chosen == 0 else
           f"the best validation agreement ({100 * max(h['val_agreement'] for h in history):.1f}%)")
    signal = f" The deciding signal: {_e(student['selection'])}." if student.get("selection") else ""
    return ("<section><h2>Training</h2>" + _img(_training_chart(history, chosen), "image/png", "validation agreement per epoch")
            + f"<p>Chosen: epoch {chosen}, {why}; epoch 0 (as initialised) always competes.{signal}</p></section>")


def _deployment(page: Page) -> str:
    exp = page.export
    rows = [[_e(r.file) + (" <span class=ok>deployable</span>" if n == exp.deployable_variant else ""), _e(r.precision),
             f"{r.size_mb:.1f}", _pct(r.agreement), f"{r.cosine:.4f}", _pct(r.teacher_agreement),
             *(f"{getattr(r.latency_ms, q):.2f}" for q in ("p50", "p90", "p99")), "yes" if r.eligible else "no"]
            for n, r in exp.variants.items()]
    return ("<section><h2>Deployment</h2>" + _table(
        ["file", "precision", "MB", "vs FP32", "cosine", "vs teacher", "p50 ms", "p90 ms", "p99 ms", "eligible"], rows)
        + _img(_latency_chart(exp.variants, page.teacher_latency), "image/png", "latency per variant")
        + "<p class=meta>Eligible: within max_drop points of FP32 agreement and fast enough; the fastest eligible "
        "variant ships. <code>distiller bench RUN --select</code> re-picks it on the device.</p>"
        + _open_set_line(page.run, exp) + "</section>")


def _accuracy(page: Page) -> str:
    """Accuracy on real images, as `distiller eval` saved it."""
    ev = read_json(page.run.paths.eval)
    if ev is None:
        return ""
    labels = ev["labels"]
    table = []
    for m, res in ev["results"].items():
        for r in res["rows"]:
            lo, hi = r["balanced_ci"]
            per = ", ".join(f"{labels[int(c)]} {100 * v['recall']:.0f}% [{100 * v['ci'][0]:.0f}, {100 * v['ci'][1]:.0f}] "
                            f"(n {v['n']})" for c, v in r.get("per_class", {}).items())
            table.append([_e(m), _e(r["domain"]), str(r["n"]), f"{100 * r['balanced_accuracy']:.1f} [{100 * lo:.1f}, "
                          f"{100 * hi:.1f}]", _e(per)])
    overlap = (f"<p class=warn>{ev['training_overlap']} of these images are among the run's own --images or example images: a score on "
               "them is not an accuracy.</p>") if ev.get("training_overlap") else ""
    rejection = [[_e(m), f"{res['open_set']['auroc']:.3f} [{res['open_set']['auroc_ci'][0]:.3f}, "
                  f"{res['open_set']['auroc_ci'][1]:.3f}]", f"{100 * res['open_set']['other_accuracy']:.1f} "
                  f"[{100 * res['open_set']['other_ci'][0]:.1f}, {100 * res['open_set']['other_ci'][1]:.1f}]",
                  f"{res['open_set']['known_images']} / {res['open_set']['other_images']}"]
                 for m, res in ev["results"].items() if res.get("open_set")]
    return ("<section><h2>Accuracy on real images</h2>" + f"<p class=meta>{_e(ev['data'])}: {ev['images']} images, "
            f"content sha256 {_e(ev['content_hash'][:16])}..., scored {_e(ev['date'])}</p>" + overlap
            + _img(_accuracy_chart(ev), "image/png", "balanced accuracy per domain")
            + _table(["model", "domain", "n", "balanced [95% CI]", "recall per class [95% CI]"], table)
            + (("<p>Known classes against images of other things (<code>--other-data</code>):</p>" + _table(
                ["model", "AUROC known vs other [95% CI]", "answered other (%) [95% CI]", "known / other images"],
                rejection)) if rejection else "") + "</section>")


def _timings(page: Page) -> str:
    t = page.report.get("timings_s", {})
    return ("<section><h2>Timings</h2>" + _table(["stage", "seconds"], [[_e(k), f"{v:.1f}"] for k, v in t.items()])
            + "<details><summary>The full recipe (recipe.toml)</summary><pre>" + _e(page.run.paths.recipe.read_text())
            + "</pre></details></section>")


def _open_set_line(run: Run, exp: ExportRecord) -> str:
    """What an open-set model answers for none of its classes, and how its rule was set: at export, or by
    ``eval --fit`` (eval.json keeps the rule it wrote into each file)."""
    if not run.recipe.openset or not exp.open_set:
        return ""
    fitted = ((read_json(run.paths.eval) or {}).get("open_set_fit") or {}).get(exp.deployable)
    rule = OpenSetRule.from_json(fitted["rule"] if fitted else exp.open_set, str(run.paths.export))
    return f"<p>{_e(describe_rule(rule, run.recipe.other_label, run.recipe.other_bias))}</p>"
