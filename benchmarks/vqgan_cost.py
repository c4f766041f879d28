"""What the vqgan prior costs on this machine: one decoder forward + backward to the latents, per image and step.

Random weights (none can be had offline), so this measures time only, never image quality. Configurations:
the tests' tiny VQModel (distiller.testing.TINY_VQ) at 64 px, and a real-size f16 VQGAN decoder (taming's
ImageNet f16 layout in diffusers' VQModel: 128-128-256-256-512 channels, 2 layers per block, 256-d codes,
16384 of them) at 224 px, the CLIP teacher's input size.

    python benchmarks/vqgan_cost.py [--repeats 5] [--threads 2]

Prints a table: seconds per image-step, median [min, max] over the repeats after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

F16 = {"down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
       "block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2, "latent_channels": 256,
       "num_vq_embeddings": 16384, "vq_embed_dim": 256, "norm_num_groups": 32}


def measure(config: dict, size: int, batch: int, repeats: int) -> tuple[float, float, float, float]:
    import torch
    from diffusers import VQModel

    from distiller.priors import downsampling
    torch.manual_seed(0)
    vq = VQModel(**config).eval().requires_grad_(False)
    side = -(-size // downsampling(vq))
    z = torch.randn(batch, vq.quantize.embedding.weight.shape[1], side, side, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        q = vq.quantize(z)[0]
        vq.decoder(vq.post_quant_conv(q)).float().mean().backward()
        times.append((time.perf_counter() - t0) / batch)
    times = times[1:]
    params = sum(p.numel() for n, p in vq.named_parameters() if n.startswith(("decoder", "post_quant"))) / 1e6
    return statistics.median(times), min(times), max(times), params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from distiller.testing import TINY_VQ
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {args.repeats} repeats after a warm-up; random weights: time only")
    print("| decoder | parameters | px | batch | s per image-step, median [min, max] |")
    print("|---|---|---|---|---|")
    for name, cfg, size in (("tiny (tests)", TINY_VQ, 64), ("f16 real-size", F16, 224)):
        for batch in (1, 4):
            med, lo, hi, params = measure(cfg, size, batch, args.repeats)
            print(f"| {name} | {params:.1f} M | {size} | {batch} | {med:.3f} [{lo:.3f}, {hi:.3f}] |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
