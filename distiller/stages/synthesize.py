"""The surrogate bank (``bank/``), ``teacher.json`` and ``samples.png``."""
from __future__ import annotations

from runtime.atomic import write_bytes, write_json

from ..bank import Bank
from ..generator import sampler
from ..priors import PRIORS, cost_warning
from ..ranks import share_shards, world
from ..runfolder import Run
from ..synthesis import bank_plan, fill_bank
from .base import Progress
from .generator import synthesis_inputs, trained_generator


class SynthesizeStage:
    name = "synthesize"
    sharded = True     # every rank fills its share of the shards (ranks)

    def done(self, run: Run) -> bool:
        bank = Bank(run.paths.bank)
        return bank.is_complete() and bank.manifest.exists()

    def work(self, run: Run) -> int:
        return bank_plan(run.recipe, run.labels).num_shards

    def describe(self, run: Run) -> str:
        syn, plan = run.recipe.synthesis, bank_plan(run.recipe, run.labels)
        neg = plan.negatives
        return (f"synthesis ({plan.concept_images} images{f' + {neg} negatives' if neg else ''}, "
                f"{PRIORS.get(syn.prior).steps(syn)} steps, {syn.prior} prior)")

    def run(self, run: Run, progress: Progress) -> None:
        rec, bank, w = run.recipe, Bank(run.paths.bank), world()
        teacher = run.teacher()
        if w.main:
            write_json(run.paths.teacher, teacher.describe())
            for note in teacher.warnings():
                run.warn(note)
            note = cost_warning(rec.synthesis, run.resolution(), bank_plan(rec, run.labels).total, run.device)
            if note:
                run.warn(note)
        source, objective = synthesis_inputs(run)
        plan = bank_plan(rec, run.labels, source.style_names, run.resolution())
        produce = None
        if rec.synthesis.generator_steps:
            produce = sampler(trained_generator(run, source, objective), objective, rec.synthesis, run.device)

        def fill(mine, on_shard):
            fill_bank(bank, plan, teacher, source, rec.synthesis, run.device, run.autocast(), on_shard=on_shard,
                      objective=objective, produce=produce, shards=mine)
        if share_shards(bank, plan.num_shards, progress, start=lambda: bank.start(plan), fill=fill, what="synthesis"):
            bank.write_manifest()
            write_bytes(run.paths.samples, bank.samples_png())
