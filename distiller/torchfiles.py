"""torch files of the run folder (checkpoints, learnt styles, embeddings): written atomically through
``runtime.atomic``, read back as data only (``weights_only``: tensors and plain types, never code, so a tampered
or downloaded run folder cannot run anything), with a one-line ``UserError`` for a damaged or foreign file."""
from __future__ import annotations

import os
import pickle

from runtime.atomic import atomic_path
from runtime.errors import UserError


def save_torch(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)`` of a run-folder file; a damaged, truncated or foreign one (a pickle that
    would run code included) is a ``UserError`` naming the fix."""
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise UserError(f"{path} is damaged or not written by distiller ({type(exc).__name__}): delete it and run "
                        "the same command again to redo that step") from None
