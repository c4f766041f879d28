"""A tiny randomly initialised open_clip model (and VQGAN decoder), for tests and offline try-outs of the pipeline.

    python -m distiller.testing DIR      # writes DIR/tiny.json, DIR/tiny.pt and DIR/tiny-vq/
    distiller make --classes cat,dog --teacher DIR/tiny.json --pretrained DIR/tiny.pt --recipe smoke
    ... --set 'synthesis.prior="vqgan"' --set 'synthesis.prior_weights="DIR/tiny-vq"'

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


# two down blocks (f = 2), 4 latent channels, 64 codes: a VQModel in miniature (diffusers' own class)
TINY_VQ = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
           "block_out_channels": [32, 64], "latent_channels": 4, "num_vq_embeddings": 64, "sample_size": 64,
           "norm_num_groups": 32, "layers_per_block": 1, "mid_block_add_attention": False}   # no attention: 1.6x faster


def make_tiny_vq(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random diffusers ``VQModel`` saved with ``save_pretrained`` into ``folder``."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(seed)
    VQModel(**TINY_VQ).save_pretrained(str(folder))
    return Path(folder)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for p in (*make_tiny_clip(out), make_tiny_vq(out / "tiny-vq")):
        print(p)
