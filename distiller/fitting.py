"""``distiller eval RUN --data DIR --other-data DIR2 --fit``: the open-set threshold fitted on the user's own
labelled photos, written into every exported variant of the run.

Each variant is fitted on its own outputs (an INT8 file's scores differ a little from FP32's), on ``FIT_SCORE``
unless ``--score`` names another. Every variant is fitted before any file is written, so a
sample too small or a model that cannot run writes nothing; each file is then replaced atomically, and a fit
killed half-way is done again, with the same result, by the same command."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from exporter import write_metadata
from runtime import Classifier
from runtime.errors import UserError
from runtime.metadata import SCHEMA_VERSION

from .evaluation import Dataset, batch_predictor, load_image_folder, other_images, readable_outputs, run_variants
from .openset import FIT_SCORE, Fit, fit_rule


def _outputs(clf: Classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Outputs [M, K + 1] as the rule reads them (other_bias applied) of the M readable images, and which those are."""
    z, readable = readable_outputs(batch_predictor(lambda p: clf.preprocess([p])[0], clf.logits, clf.metadata.outputs),
                                   paths)
    return clf.scores(z), readable


def fit_run(run: Path, data: Path, other_data: Path | None, keep: float, score: str | None,
            labels_map: dict[str, str] | None = None) -> dict[str, Fit]:
    """Fit and write the open-set rule of every variant of ``run``; {variant file: fit}."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--fit writes into a run folder's models: pass the run folder, not {run}")
    if other_data is None:
        raise UserError("--fit needs --other-data DIR2 (images of none of the classes) to show what the threshold buys")
    files, _ = run_variants(run)
    clfs = {str(f.relative_to(run)): Classifier.load(f, exact=True) for f in files}
    first = next(iter(clfs.values()))
    if not first.other_label:
        raise UserError(f"{run}: its models are closed-set (no other output), so there is no threshold to fit: make the "
                        "run with openset = true")
    dataset: Dataset = load_image_folder(data, first.labels, labels_map)
    others = other_images(other_data)
    k = len(first.labels)
    fits = {}
    for name, clf in clfs.items():
        known, readable = _outputs(clf, [s.path for s in dataset.samples])
        truth = np.array([s.label for s in dataset.samples])[readable]
        fits[name] = fit_rule(score or FIT_SCORE, known, truth, _outputs(clf, others)[0], k, keep,
                              source=f"fit on {len(truth)} labelled images of {Path(data).name}")
    for name, clf in clfs.items():
        write_metadata(clf.path, clf.metadata.replace(open_set=fits[name].rule, schema_version=SCHEMA_VERSION))
    return fits
