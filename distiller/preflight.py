"""Every check that can fail on user input, made once before ``make`` writes anything: the device, the bank's
shape, the student, the open-set label, distillation weights, export variants, the teacher, the prior, the
prompt source, the judges and the synthesis objective."""
from __future__ import annotations

import dataclasses

from exporter import VARIANTS
from runtime.errors import UserError

from .bridge import HeadSource, decide_heads
from .concepts import Concept
from .distill import check_weights
from .judge import judge_names, student_teacher_name
from .priors import check_prior
from .prompts import check_source
from .recipe import Recipe
from .runfolder import resolve_device
from .students import student_spec
from .synthesis import bank_plan, synthesis_networks
from .teachers import check_teacher, judge_cfg, resolve_family


def preflight(recipe: Recipe, concepts: list[Concept], offline: bool = False, images: bool = False) -> None:
    """Every check that can fail on user input, before anything is written. ``images``: --images was given."""
    resolve_device(recipe.device)
    by_example = [c.label for c in concepts if c.examples]
    if by_example and not resolve_family(recipe.teacher.model).learns_examples:
        raise UserError(f"{', '.join(by_example)}: teacher {recipe.teacher.model} cannot learn a concept by example: use "
                        "an ImageNet teacher (--teacher efficientnet-lite0|1|2 or timm:NAME) or a CLIP teacher")
    bank_plan(recipe, [c.label for c in concepts], resolution=recipe.synthesis.resolution).validate()
    bridged = resolve_family(recipe.teacher.model).has_text_tower and recipe.student.head == "imagenet"
    if bridged:   # head = imagenet with a CLIP teacher: the text bridge may yet find rows WordNet has not
        student_spec(recipe, concepts, decide_heads(concepts, "auto"))
    else:
        student_spec(recipe, concepts)
    if recipe.openset:
        labels = [c.label for c in concepts]
        if not recipe.other_label.strip() or recipe.other_label.casefold() in {x.casefold() for x in labels}:
            raise UserError(f"other_label {recipe.other_label!r} " + ("is empty" if not recipe.other_label.strip() else
                            "is also one of the classes") + ": pass another name with --other-label NAME")
    check_weights(recipe.distill)
    for v in recipe.export.variants:
        VARIANTS.get(v)
    check_teacher(recipe.teacher, offline, concepts)
    check_prior(recipe.synthesis, offline)
    check_source(recipe.prompts, resolve_family(recipe.teacher.model).has_text_tower)
    check_judges(recipe, concepts, offline)
    check_synthesis(recipe, concepts, offline)
    if recipe.calibration.source == "real" and not images:
        raise UserError("calibration.source = real calibrates INT8 on your own images: give --images DIR, or use "
                        "calibration.source = auto")


def check_judges(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Every network that may judge the bank can be had: taken as if each concept had ImageNet rows (the CLIP
    bridge is only known once the teacher has read the classes)."""
    heads = [HeadSource(c.label, "wordnet") for c in concepts]
    for name in judge_names(recipe, concepts, heads, synthesis_networks(recipe, concepts), student_teacher_name(recipe)):
        judge = judge_cfg(dataclasses.replace(recipe.teacher, judge=name))
        # an ImageNet judge of a CLIP run scores pooled rows, not WordNet synsets: its concepts are not checked
        check_teacher(judge, offline, concepts if not resolve_family(recipe.teacher.model).has_text_tower else None)


def check_synthesis(recipe: Recipe, concepts: list[Concept], offline: bool = False) -> None:
    """Ensemble members share the teacher's targets (ImageNet classes); the adversarial term needs a
    pretrained student to disagree with (a scratch one at step 0 is noise) and an ImageNet teacher.
    (Numeric ranges are the recipe's own bounds.)"""
    syn, teacher = recipe.synthesis, recipe.teacher.model
    imagenet = resolve_family(teacher).scores_imagenet
    for name in syn.ensemble:
        if name == teacher or not resolve_family(name).scores_imagenet or not imagenet:
            raise UserError(f"synthesis.ensemble = {list(syn.ensemble)}: members must be ImageNet classifiers other than "
                            f"the teacher (efficientnet-lite0|1|2, timm:NAME) with an ImageNet teacher; {name!r} is not")
        check_teacher(dataclasses.replace(recipe.teacher, model=name), offline, concepts)
    if syn.adversarial and (recipe.student.init != "pretrained" or not imagenet
                            or not student_spec(recipe, concepts).pooled):
        raise UserError("synthesis.adversarial needs an ImageNet teacher and a pretrained student with its ImageNet "
                        "head (student.init = pretrained, student.head = auto|imagenet): the student as initialised "
                        "is what the images are pushed to disagree with. Set it to 0 otherwise")


