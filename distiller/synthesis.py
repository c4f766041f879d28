"""Surrogate-image synthesis: optimise images from noise until the teacher sees their targets.

What is optimised is the image prior's (``priors.py``, ``synthesis.prior``): the default is the
Fourier-spectrum / decorrelated-colour parametrisation of feature visualisation (Olah et al., Lucid,
``FourierImage`` here), which biases the optimisation towards natural 1/f images, seen through
transformation robustness: every step scores several random crops, flips and rotations of each image,
so the result must look like its target from many views rather than through one pixel-exact
adversarial pattern. DeepInversion's pixels and the paper's VQGAN latents are the other priors.

``synthesize`` knows nothing about files: it takes targets and returns finished uint8 images; ``fill_bank``
writes them, shard by shard, into the bank.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from .bank import Bank, BankPlan, image_sha256
from .priors import crop_views, make_prior
from .students import create_student, student_spec
from .teachers import build_teacher, network_name, resolve_family


class Objective:
    """What synthesis minimises per image, beyond one teacher's own loss (DeepInversion and its kin).

    ``extra`` teachers (an ensemble sharing the teacher's targets): their losses are averaged in, so
    an image must convince every network rather than exploit one network's quirks. ``competitor``
    (the student as initialised): DeepInversion's Adaptive term, ``adversarial`` x (1 - JS(teacher,
    competitor)) with JS in [0, 1] over the concepts, pushes images to where the student still
    disagrees with the teacher. It is what ``synthesize`` needs of a teacher (``input_size``,
    ``synthesis_loss``), so either can be handed to it.
    """

    def __init__(self, teacher, extra=(), competitor=None, adversarial: float = 0.0):
        self.teacher, self.extra = teacher, list(extra)
        self.competitor, self.adversarial = competitor, float(adversarial)
        self.input_size = teacher.input_size

    def synthesis_loss(self, views, targets, classes, cfg) -> torch.Tensor:
        if self.competitor is not None and self.adversarial:
            loss, logits = self.teacher.synthesis_loss_and_logits(views, targets, classes, cfg)
        else:
            loss, logits = self.teacher.synthesis_loss(views, targets, classes, cfg), None
        for t in self.extra:
            loss = loss + t.synthesis_loss(views, targets, classes, cfg)
        loss = loss / (1 + len(self.extra))
        if logits is not None:
            k = self.teacher.num_classes   # disagreement over the concepts ("other" holds most of the mass)
            loss = loss + self.adversarial * (1 - js_divergence(logits[:, :k].float(), self.competitor(views)[:, :k].float()))
        return loss


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per row Jensen-Shannon divergence of two softmax distributions, in bits (0 same, 1 disjoint)."""
    pa, pb = logits_a.softmax(-1), logits_b.softmax(-1)
    m = (0.5 * (pa + pb)).clamp_min(1e-12).log()
    kl = lambda p, lp: (p * (lp - m)).sum(-1)   # noqa: E731
    return (0.5 * kl(pa, logits_a.log_softmax(-1)) + 0.5 * kl(pb, logits_b.log_softmax(-1))) / np.log(2.0)


class Competitor(torch.nn.Module):
    """A frozen student taking synthesis views ([0, 1], any size) through its own size and normalisation."""

    def __init__(self, model, size: int, mean, std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = size
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[-1] != self.size:
            views = torch.nn.functional.interpolate(views, size=(self.size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.model((views - self._mean) / self._std)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))


def robust_loss(objective, img: torch.Tensor, targets, classes: torch.Tensor, cfg, generator: torch.Generator,
                views=None) -> torch.Tensor:
    """Per image of ``img`` [B, 3, H, W]: ``objective``'s synthesis loss averaged over ``cfg.crops`` random
    views (default: crop, flip, rotation, noise; a prior may bring its own, ``views(img, size, generator)``).
    ``targets`` None: the objective aims at ``classes`` itself."""
    b = img.shape[0]
    v = views(img, objective.input_size, generator) if views else crop_views(img, objective.input_size, generator, cfg)
    rep = None if targets is None else targets.repeat(cfg.crops, *([1] * (targets.dim() - 1)))
    return objective.synthesis_loss(v, rep, classes.repeat(cfg.crops), cfg).float().view(cfg.crops, b).mean(0)


def synthesize(teacher, targets: torch.Tensor, classes: torch.Tensor, cfg, size: int, generator: torch.Generator, device="cpu", autocast=None, on_step=None):
    """Optimise ``len(targets)`` images (``classes``: each one's concept index) of ``size`` px through the recipe's
    image prior (``synthesis.prior``: phases, images, views, penalties); returns (uint8 [B, H, W, 3] CPU tensor,
    final loss [B])."""
    b = targets.shape[0]
    prior = make_prior(cfg, b, size, generator, device)
    loss_cfg = prior.loss_cfg(cfg)
    targets, classes = targets.to(device), classes.to(device)
    loss_per, step = torch.zeros(b), 0
    for phase, steps in enumerate(prior.schedule()):
        opt, sched = prior.begin(phase)
        for _ in range(steps):
            img = prior.image()
            with autocast() if autocast else _null():
                loss = robust_loss(teacher, img, targets, classes, loss_cfg, generator, prior.views)
            if cfg.tv_weight:
                loss = loss + cfg.tv_weight * total_variation(img)
            extra = prior.penalty()
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if sched is not None:
                sched.step()
            prior.after_step()
            loss_per, step = loss.detach().cpu(), step + 1
            if on_step:
                on_step(step, float(loss_per.mean()))
    final = (prior.final() * 255).round().clamp(0, 255).to(torch.uint8)
    return final.permute(0, 2, 3, 1).cpu().contiguous(), loss_per


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def teacher_logits(teacher, images_u8: torch.Tensor, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Teacher logits over the concepts for uint8 [N, H, W, 3] images, as float32 [N, K] on CPU."""
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i:i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append(teacher.logits(x).float().cpu())
    return torch.cat(out)


def negative_images(recipe, k: int) -> int:
    """Negatives in the bank: ``synthesis.negative_share`` of it, for open-set teachers with a text tower synthesising
    image by image (ImageNet teachers' "other" is their non-member classes; a generator is class-conditioned)."""
    syn = recipe.synthesis
    if not recipe.openset or not resolve_family(recipe.teacher.model).has_text_tower or syn.generator_steps:
        return 0
    return round(syn.negative_share / (1 - syn.negative_share) * syn.images_per_class * k)


def bank_plan(recipe, labels, style_names=("plain",), resolution: int = 0) -> BankPlan:
    """What the recipe's bank holds for these labels: its images, negatives and shards depend on nothing else (the
    styles and resolution are the prompt source's and the teacher's, known once they are built)."""
    syn = recipe.synthesis
    return BankPlan(tuple(labels), tuple(style_names), syn.images_per_class, syn.shard_size, resolution, syn.val_every,
                    recipe.seed, negative_images(recipe, len(labels)))


def synthesis_objective(recipe, concepts, teacher, device="cpu", offline=False):
    """The teacher, or an ``Objective`` with the recipe's ensemble and adversarial competitor."""
    syn = recipe.synthesis
    if not syn.ensemble and not syn.adversarial:
        return teacher
    extra = [build_teacher(dataclasses.replace(recipe.teacher, model=name, judge="none"), concepts, device, offline,
                           openset=recipe.openset)
             for name in syn.ensemble]
    competitor = None
    if syn.adversarial:
        spec = student_spec(recipe, concepts)
        p = spec.preprocess
        competitor = Competitor(create_student(spec, recipe.student.init), p.size, p.mean, p.std).to(device)
    return Objective(teacher, extra, competitor, syn.adversarial)


def synthesis_networks(recipe, concepts) -> tuple[str, ...]:
    """Networks besides the teacher that shaped the bank (so none of them may judge it)."""
    used = list(recipe.synthesis.ensemble)
    if recipe.synthesis.adversarial:
        used.append(network_name(student_spec(recipe, concepts).model))
    return tuple(used)


def fill_bank(bank: Bank, plan: BankPlan, teacher, source, cfg, device="cpu", autocast=None,
              on_shard: Callable[[int, int], None] | None = None, on_step=None, objective=None, produce=None,
              shards=None) -> None:
    """Synthesize every missing shard of ``plan`` into ``bank`` (resumable), then its manifest. The images
    minimise ``objective`` (default: the teacher's own loss), or come from ``produce(targets, classes, gen)``
    (a trained generator); the teacher labels them. ``shards``: only these (one rank's share); the caller
    then starts the bank before and writes the manifest after every rank is done."""
    if shards is None:
        bank.start(plan)
    done = set(bank.complete())
    for i in (range(plan.num_shards) if shards is None else shards):
        if i in done:
            continue
        seed = plan.shard_seed(i)
        gen = torch.Generator().manual_seed(seed)
        idx = list(plan.indices(i))
        cls = torch.tensor([plan.class_of(g) for g in idx])
        sty = torch.tensor([plan.style_of(g) for g in idx])
        neg = cls == plan.num_classes
        targets = source.targets(cls.clamp(max=plan.num_classes - 1), sty, gen)
        if neg.any():   # negatives aim at the generic prompts' embeddings, each its own prompt
            bank_neg = teacher.negative_targets
            rows = [plan.negative_prompt(g, len(bank_neg)) for g, n in zip(idx, neg) if n]
            targets = targets.clone()
            targets[neg] = bank_neg[rows].to(targets)
        if produce is not None:
            images, loss = produce(targets, cls, gen)
        else:
            images, loss = synthesize(objective or teacher, targets, cls, cfg, plan.resolution, gen, device, autocast, on_step)
        logits = teacher_logits(teacher, images, device=device)
        prior = "generator" if produce is not None else cfg.prior   # what made the images
        records = [
            {"index": g, "shard": i, "source": "surrogate", "class": int(c), "label": plan.labels[int(c)], "style": int(s),
             "style_name": plan.style_names[int(s)], "seed": seed, "split": plan.split(i),
             "synthesis_loss": round(float(lo), 5), "prior": prior, "path": None, "sha256": image_sha256(im)}
            if not plan.is_negative(g) else
            {"index": g, "shard": i, "source": "negative", "class": None, "label": None, "style": None,
             "style_name": f"other: prompt {plan.negative_prompt(g, len(teacher.negative_targets))}", "seed": seed,
             "split": plan.split(i), "synthesis_loss": round(float(lo), 5), "prior": prior, "path": None,
             "sha256": image_sha256(im)}
            for g, c, s, lo, im in zip(idx, cls, sty, loss, images.numpy())
        ]
        bank.write_shard(i, images.numpy(), logits.numpy(), records)
        if on_shard:
            on_shard(i, plan.num_shards)
    if shards is None:
        bank.write_manifest()
