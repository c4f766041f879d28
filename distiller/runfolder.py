"""The run folder's layout: where each artefact of a run lives (runs/<name>/...)."""
from __future__ import annotations

from pathlib import Path


class RunPaths:
    """Where each artifact of a run lives (runs/<name>/...)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    recipe = property(lambda s: s.root / "recipe.toml")
    concepts = property(lambda s: s.root / "concepts.json")
    text_embeddings = property(lambda s: s.root / "text_embeddings.pt")
    styles = property(lambda s: s.root / "styles.pt")
    bank = property(lambda s: s.root / "bank")
    checkpoints = property(lambda s: s.root / "checkpoints")
    samples = property(lambda s: s.root / "samples.png")
    export = property(lambda s: s.root / "export.json")
    report = property(lambda s: s.root / "report.json")
    timings = property(lambda s: s.root / "timings.json")
    judge = property(lambda s: s.root / "judge.json")
    teacher = property(lambda s: s.root / "teacher.json")
    generator = property(lambda s: s.root / "generator.pt")   # synthesis.generator_steps > 0
    warnings = property(lambda s: s.root / "warnings.json")   # every warning the run printed
    eval = property(lambda s: s.root / "eval.json")           # `distiller eval RUN --data DIR`, saved
    teacher_latency = property(lambda s: s.root / "teacher_latency.json")
    html = property(lambda s: s.root / "report.html")
    images = property(lambda s: s.root / "images.json")       # --images: the user's files (images.py)
    heads = property(lambda s: s.root / "heads.json")         # each concept's head source (bridge.py)
