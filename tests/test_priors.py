"""Image priors (synthesis.prior): fourier, DeepInversion's pixels, and VQGAN latents through a diffusers VQModel.
A tiny random VQModel (two down blocks, 32/64 channels, 4 latent channels, 64 codes) and the tiny CLIP teacher."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from conftest import smoke_args
from distiller.cli import main
from distiller.concepts import parse_concepts
from distiller.priors import PixelsPrior, VQGANPrior, check_vq, load_vq, make_prior
from distiller.recipe import load_recipe
from distiller.synthesis import synthesize
from distiller.teachers import build_teacher

CONCEPTS = parse_concepts("cat,dog")


@pytest.fixture(scope="module")
def clip(tiny_clip, tiny_vq):
    cfg, weights = tiny_clip
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights), "device": "cpu",
                                "synthesis.prior_weights": str(tiny_vq)})
    return rec, build_teacher(rec.teacher, CONCEPTS, openset=rec.openset)


def _syn(rec, **kw):
    return dataclasses.replace(rec.synthesis, **kw)


def test_a_saved_tiny_vqmodel_loads_through_prior_weights_and_gradients_reach_its_latents(clip, tiny_vq):
    rec, _ = clip
    check_vq(str(tiny_vq))                                   # a VQModel folder passes the check
    vq = load_vq(str(tiny_vq))
    assert type(vq).__name__ == "VQModel" and vq.config.num_vq_embeddings == 64
    prior = make_prior(_syn(rec, prior="vqgan"), 2, 64, torch.Generator().manual_seed(0))
    assert isinstance(prior, VQGANPrior) and tuple(prior.z.shape) == (2, 4, 32, 32)   # 64 px / f2
    img = prior.image()
    assert tuple(img.shape) == (2, 3, 64, 64) and 0 <= float(img.detach().min()) and float(img.detach().max()) <= 1
    img.mean().backward()
    assert prior.z.grad is not None and float(prior.z.grad.abs().sum()) > 0


def test_straight_through_quantisation_decodes_codebook_entries(clip):
    rec, _ = clip
    on = make_prior(_syn(rec, prior="vqgan"), 2, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        on.z.add_(0.05 * torch.randn_like(on.z))             # latents moved off the codebook by optimisation
    codebook = on.vq.quantize.embedding.weight
    rows = on.latents().detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    nearest = codebook[torch.cdist(rows, codebook).argmin(1)]
    assert torch.allclose(rows, nearest, atol=1e-6)            # every latent the decoder reads is a code
    off = make_prior(_syn(rec, prior="vqgan", vqgan=dataclasses.replace(rec.synthesis.vqgan, quantize=False)), 2, 32,
                     torch.Generator().manual_seed(0))
    with torch.no_grad():
        off.z.add_(0.05 * torch.randn_like(off.z))
    assert torch.equal(off.latents(), off.z)                  # quantize = false: the continuous latents
    assert float(torch.cdist(off.latents().detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]), codebook).min(1).values.max()) > 1e-3


def test_vqgan_synthesis_with_the_tiny_clip_teacher_lowers_its_loss(clip):
    rec, teacher = clip
    cls = torch.tensor([0, 1, 0, 1])
    losses = []
    img, _ = synthesize(teacher, teacher.text[cls], cls, _syn(rec, prior="vqgan", steps=8), 64,
                        torch.Generator().manual_seed(0), on_step=lambda i, loss: losses.append(loss))
    assert img.shape == (4, 64, 64, 3) and img.dtype == torch.uint8
    assert losses[-1] < losses[0], losses


def test_pixels_jitter_and_flip_are_applied(clip):
    rec, _ = clip
    prior = make_prior(_syn(rec, prior="pixels", crops=1), 2, 32, torch.Generator().manual_seed(0))
    img = prior.image().detach()
    gen, seen = torch.Generator().manual_seed(1), set()
    lim = round(rec.synthesis.pixels.jitter * 32)
    for _ in range(30):
        v = prior.views(img, 32, gen)
        match = [(dx, dy, f) for dx in range(-lim, lim + 1) for dy in range(-lim, lim + 1) for f in (False, True)
                 if torch.equal(v, (lambda r: r.flip(3) if f else r)(torch.roll(img, (dx, dy), (2, 3))))]
        assert match, "a view is not a roll (and flip) of the image"
        seen |= set(match)
    assert {f for *_, f in seen} == {False, True}             # flipped about half the time
    assert len({(dx, dy) for dx, dy, _ in seen}) > 5          # shifted by varying amounts


def test_the_multi_resolution_schedule_hands_the_image_up_in_size(clip):
    rec, teacher = clip
    syn = _syn(rec, prior="pixels", resolutions=(16, 32), resolution_steps=(3, 2))
    prior = make_prior(syn, 2, 64, torch.Generator().manual_seed(0))
    assert isinstance(prior, PixelsPrior) and prior.schedule() == [3, 2] and prior.x.shape[-1] == 16
    prior.begin(0)
    small = prior.x.detach().clone()
    prior.begin(1)
    assert prior.x.shape[-1] == 32
    back = torch.nn.functional.avg_pool2d(prior.x.detach(), 2)                 # the same image, larger
    assert float(torch.corrcoef(torch.stack([back.flatten(), small.flatten()]))[0, 1]) > 0.8
    assert prior.final().shape[-1] == 64                      # the bank's resolution
    steps = []
    cls = torch.tensor([0, 1])
    img, _ = synthesize(teacher, teacher.text[cls], cls, syn, 64, torch.Generator().manual_seed(0), on_step=lambda i, _: steps.append(i))
    assert steps == [1, 2, 3, 4, 5] and img.shape == (2, 64, 64, 3)


def test_the_deepinversion_bn_prior_weights_its_first_layer(clip):
    from distiller.bnstats import BNStats
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.BatchNorm2d(4)).eval()
    stats = BNStats(net)
    x = torch.randn(8, 3, 5, 5)
    stats.terms, stats.active, stats.form = [], True, "l2"
    net(x)
    h = net[0](x)
    hand = torch.norm(net[1].running_var - h.var((0, 2, 3), unbiased=False)) + torch.norm(net[1].running_mean - h.mean((0, 2, 3)))
    assert float(stats.terms[0].detach()) == pytest.approx(float(hand.detach()), rel=1e-5)
    assert float(stats.prior(10.0).detach()) == pytest.approx(float((10 * stats.terms[0] + stats.terms[1]).detach()), rel=1e-6)


def _digest(bank):
    return {str(p.relative_to(bank)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bank.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("prior", ["pixels", "vqgan"])
def test_a_kill_mid_shard_resumes_to_byte_identical_shards(clip, tmp_path, monkeypatch, prior):
    """fourier's is test_bank_resume (a real SIGKILL); here the kill is an interrupt in the middle of shard 1."""
    from distiller.pipeline import Run, init_run, run_stages
    from distiller.stages import stage_group
    rec, _ = clip
    rec = rec.replace({"synthesis.prior": prior, "synthesis.images_per_class": 8, "synthesis.shard_size": 4,
                       "synthesis.steps": 4})
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        init_run(root, rec, CONCEPTS)
    run_stages(Run(whole), stage_group("synthesize"))
    import distiller.synthesis as synthesis
    real, calls = synthesis.robust_loss, [0]

    def dying(*a, **kw):   # one call per optimisation step
        calls[0] += 1
        if calls[0] == 4 + 2:   # shard 0 written (4 steps), shard 1 half optimised
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(synthesis, "robust_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stages(Run(killed), stage_group("synthesize"))
    assert [p.name for p in (killed / "bank").glob("shard_[0-9]*")] == ["shard_00000"]
    monkeypatch.undo()
    run_stages(Run(killed), stage_group("synthesize"))
    assert _digest(killed / "bank") == _digest(whole / "bank")
    recs = [json.loads(line) for line in (whole / "bank" / "manifest.jsonl").read_text().splitlines()]
    assert {r["prior"] for r in recs} == {prior}               # the manifest says what made each image


@pytest.mark.parametrize("prior", ["vqgan", "pixels"])
def test_the_issue_call_finishes_with_a_complete_bank(tiny_clip, tiny_vq, tmp_path, prior):
    args = smoke_args(tiny_clip, tmp_path, "r", "--set", f'synthesis.prior="{prior}"',
                      "--set", f'synthesis.prior_weights="{tiny_vq}"')
    # the issue's call with a smaller bank (8 per class, negatives added) and a quicker student: the suite's budget
    args += ["--set", "synthesis.images_per_class=8", "--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]']
    assert main(args) == 0
    from distiller.bank import Bank
    bank = Bank(tmp_path / "r" / "bank")
    lines = (bank.root / "manifest.jsonl").read_text().splitlines()
    assert bank.is_complete() and len(lines) == bank.plan().total > 0
    assert (tmp_path / "r" / "report.json").is_file() and (tmp_path / "r" / "samples.png").is_file()
    assert {json.loads(x)["prior"] for x in lines} == {prior}
    from distiller.bank import row_label
    assert row_label(json.loads(lines[0])).endswith(f"\n{prior} prior")      # samples.png's rows say it
    from distiller.runfolder import Run
    warned = [w for w in Run(tmp_path / "r").warnings() if "on a CPU" in w]
    if prior == "vqgan":   # the decoder's cost, measured, times the bank
        assert len(warned) == 1 and "s per image and step at 64 px here (measured)" in warned[0], warned
    else:
        assert not warned


@pytest.mark.parametrize("change, expect", [
    (['synthesis.prior="vqgann"'], "unknown synthesis.prior 'vqgann': did you mean vqgan"),
    (['synthesis.prior="vqgan"'], "synthesis.prior = vqgan needs its decoder"),
    (['synthesis.prior="vqgan"', 'synthesis.prior_weights="/no/such/vq"'], "synthesis.prior_weights = /no/such/vq: no such folder"),
    (['synthesis.prior="vqgan"', 'synthesis.prior_weights="NOTVQ"'], "is not a diffusers VQModel folder"),
    (['synthesis.prior="vqgan"', 'synthesis.prior_weights="someorg/some-vqgan"'], "synthesis.prior_weights = LOCAL_DIR"),
    (['synthesis.prior="pixels"', "synthesis.resolutions=[32, 64]"], "must have one entry each"),
    (['synthesis.prior="pixels"', "synthesis.resolutions=[64, 32]", "synthesis.resolution_steps=[1, 1]"], "must rise"),
    (['synthesis.bn_form="l1"'], "synthesis.bn_form = 'l1': use kl or l2"),
])
def test_bad_priors_and_weights_exit_2_with_one_line_and_write_nothing(tiny_clip, tmp_path, capsys, change, expect):
    import time
    notvq = tmp_path / "notvq"
    notvq.mkdir()
    (notvq / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    sets = []
    for c in change:
        sets += ["--set", c.replace("NOTVQ", str(notvq))]
    t0 = time.time()
    assert main(smoke_args(tiny_clip, tmp_path / "runs", "bad", "--offline", *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert time.time() - t0 < 30
    assert not (tmp_path / "runs").exists()
