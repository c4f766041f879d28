"""torch files of the run folder (checkpoints, learnt styles, embeddings): written atomically through
``runtime.atomic``, read back with a one-line ``UserError`` for a damaged file."""
from __future__ import annotations

import os
import pickle

from runtime.atomic import atomic_path
from runtime.errors import UserError


def save_torch(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)



def load_torch(path: str | os.PathLike, map_location="cpu", weights_only: bool = False):
    """``torch.load`` of a run-folder file; a damaged or truncated one is a ``UserError`` naming the fix."""
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"{path} is damaged or truncated ({type(exc).__name__}): delete it and run the same command "
                        "again to redo that step") from None
