"""A tiny randomly initialised open_clip model, for tests and offline try-outs of the pipeline.

    python -m distiller.testing DIR      # writes DIR/tiny.json and DIR/tiny.pt
    distiller make --classes cat,dog --teacher DIR/tiny.json --pretrained DIR/tiny.pt --recipe smoke

It knows nothing about cats or dogs: it exercises every stage in seconds, nothing more.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_clip(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(config JSON, weights file) of a tiny random open_clip model saved under ``folder``."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    weights = folder / "tiny.pt"
    torch.save(open_clip.create_model("tiny").state_dict(), weights)
    return cfg, weights


if __name__ == "__main__":
    for p in make_tiny_clip(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
