"""Synthesis objectives beyond one teacher: an ensemble of teachers, and DeepInversion's Adaptive
term against the student as initialised. Real EfficientNet-Lite weights, 64 px, a few steps."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distiller.cli import main
from distiller.concepts import parse_concepts
from distiller.recipe import load_recipe
from distiller.synthesis import Competitor, Objective, js_divergence, synthesize
from distiller.teachers import build_teacher, judge_cfg

CONCEPTS = parse_concepts("cats,dogs")


@pytest.fixture(scope="module")
def lites():
    rec = load_recipe("smoke", {"teacher.model": "efficientnet-lite0", "teacher.input_size": 64})
    t = {n: build_teacher(dataclasses.replace(rec.teacher, model=f"efficientnet-lite{n}"), CONCEPTS, openset=rec.openset)
         for n in (0, 1)}
    return rec, t


def _targets(t):
    cls = torch.tensor([0, 1, 0, 1])
    return torch.stack([t.members[int(c)][0] for c in cls]), cls


def _synth(objective, rec, targets, cls, steps=10):
    cfg = dataclasses.replace(rec.synthesis, steps=steps, crops=1, lr=0.1, crop_scale=(0.8, 1.0))
    img, _ = synthesize(objective, targets, cls, cfg, 64, torch.Generator().manual_seed(0))
    return img.permute(0, 3, 1, 2).float() / 255


def _target_prob(t, x, targets):
    with torch.no_grad():
        return float(t.imagenet_logits(x).softmax(-1)[torch.arange(len(targets)), targets].mean())


def test_js_divergence_is_in_bits():
    a = torch.tensor([[8.0, -8.0], [1.0, 2.0]])
    assert js_divergence(a, a).abs().max() < 1e-6
    assert float(js_divergence(a[:1], a[:1].flip(-1))) == pytest.approx(1.0, abs=1e-3)


def test_ensemble_loss_is_the_members_mean(lites):
    rec, t = lites
    targets, cls = _targets(t[0])
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = Objective(t[0], [t[1]]).synthesis_loss(x, targets, cls, rec.synthesis)
        parts = [t[i].synthesis_loss(x, targets, cls, rec.synthesis) for i in (0, 1)]
    assert torch.allclose(both, (parts[0] + parts[1]) / 2, atol=1e-5)


def test_ensemble_images_convince_the_other_member_too(lites):
    rec, t = lites
    targets, cls = _targets(t[0])
    alone = _synth(t[0], rec, targets, cls, steps=20)
    ensemble = _synth(Objective(t[0], [t[1]]), rec, targets, cls, steps=20)
    # lite0 alone makes images lite1 sees less (measured 0.008 at an earlier landing; 0.11 on a fresh install with
    # torch 2.14.1, timm 1.0.31, numpy 2.4.6, Pillow 13.0.0; 0.27 on another machine with the same versions: 20 Adam
    # steps amplify float differences); with lite1 in the loss it sees them (0.38; 0.50; 0.51)
    assert _target_prob(t[1], ensemble, targets) > 1.5 * _target_prob(t[1], alone, targets)
    assert _target_prob(t[1], ensemble, targets) > 0.3
    assert _target_prob(t[0], ensemble, targets) > 0.1


def test_adversarial_term_pushes_images_to_where_the_student_disagrees(lites):
    from distiller.students import create_student, student_spec
    rec, t = lites
    rec = rec.replace({"student.init": "pretrained", "student.head": "imagenet", "student.model": "", "student.input_size": 64})
    spec = student_spec(rec, CONCEPTS)
    comp = Competitor(create_student(spec, "pretrained"), spec.preprocess.size, spec.preprocess.mean, spec.preprocess.std)
    targets, cls = _targets(t[1])

    def disagreement(x):
        with torch.no_grad():
            k = t[1].num_classes   # over the concepts, as the objective measures it
            return float(js_divergence(t[1].logits(x)[:, :k], comp(x)[:, :k]).mean())
    plain = _synth(Objective(t[1], [], comp, 0.0), rec, targets, cls)
    pushed = _synth(Objective(t[1], [], comp, 2.0), rec, targets, cls)
    # measured 0.19 vs 0.11 on this machine (the same versions gave a wider gap where the test was written)
    assert disagreement(pushed) > 1.5 * disagreement(plain), (disagreement(pushed), disagreement(plain))


def test_the_judge_is_none_of_the_networks_that_shaped_the_bank():
    rec = load_recipe("cpu-imagenet")
    assert judge_cfg(rec.teacher).model == "efficientnet-lite0"
    assert judge_cfg(rec.teacher, ("efficientnet-lite0",)).model == "efficientnet-lite1"
    assert judge_cfg(rec.teacher, ("efficientnet-lite0", "efficientnet-lite1")) is None


def _make(tmp_path, name, *sets):
    base = ["teacher.input_size=64", "synthesis.resolution=64", "synthesis.images_per_class=4", "synthesis.shard_size=4",
            "synthesis.steps=2", "synthesis.crops=1", "distill.epochs=1", 'export.variants=["onnx-fp32"]',
            "export.latency_runs=3", "student.input_size=64"]
    return ["make", "--classes", "cats,dogs", "--teacher", "efficientnet-lite0", "--offline", "--device", "cpu", "-q",
            "--out", str(tmp_path), "--name", name, *[a for s in (*base, *sets) for a in ("--set", s)]]


@pytest.mark.parametrize("sets, message", [
    (['synthesis.ensemble=["efficientnet-lite0"]'], "other than the teacher"),
    (['synthesis.ensemble=["ViT-B-32"]'], "must be ImageNet classifiers"),
    (["synthesis.adversarial=0.5", "student.init=scratch"], "needs an ImageNet teacher and a pretrained student"),
    (["synthesis.adversarial=-1"], "synthesis.adversarial = -1.0 is out of range: use a value >= 0.0"),
])
def test_bad_synthesis_settings_exit_2_before_any_work(sets, message, tmp_path, capsys):
    assert main(_make(tmp_path, "bad", *sets)) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "bad").exists()


def test_make_with_an_ensemble_and_the_adversarial_term(tmp_path):
    """Teacher lite0, lite1 in the synthesis loss, the pretrained lite0 student as competitor: the judge
    must be lite2, the only Lite that took no part in making the bank."""
    assert main(_make(tmp_path, "ens", 'synthesis.ensemble=["efficientnet-lite1"]', "synthesis.adversarial=0.5")) == 0
    run = tmp_path / "ens"
    judge = json.loads((run / "judge.json").read_text())
    assert judge["judge"] == "efficientnet-lite2" and judge["images"] == 8
    _assert_ships_a_model(run)


# --- amortised synthesis: a generator trained on the same objective -----------------------------

def _gen_cfg(rec, steps):
    return dataclasses.replace(rec.synthesis, generator_steps=steps, shard_size=4, crops=1, crop_scale=(0.8, 1.0),
                               generator_lr=0.002)


def test_generator_learns_to_make_each_concept(lites, tmp_path):
    from distiller.generator import sampler, train_generator
    from distiller.prompts import build_prompt_source
    rec, t = lites
    src = build_prompt_source(t[0], rec.prompts)
    cls = torch.tensor([0, 1] * 8)
    targets = torch.stack([t[0].members[int(c)][0] for c in cls])
    seen = []
    for steps in (0, 60):
        cfg = _gen_cfg(rec, steps)
        g = train_generator(t[0], src, 2, 1, cfg, 64, tmp_path / f"g{steps}.pt", seed=0)
        img, loss = sampler(g, t[0], cfg)(targets, cls, torch.Generator().manual_seed(7))
        x = img.permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            seen.append(float((t[0].logits(x)[:, :2].argmax(1) == cls).float().mean()))   # which concept
    # untrained: one concept for everything (half right); trained: every sample is its own concept
    assert seen == [0.5, 1.0], seen
    assert x.std(0).mean() > 0.02   # the samples of one batch are not one image


def test_mode_seeking_term_spreads_one_concept_over_z(lites, tmp_path):
    from distiller.generator import sampler, train_generator
    from distiller.prompts import build_prompt_source
    rec, t = lites
    src = build_prompt_source(t[0], rec.prompts)
    cls = torch.zeros(8, dtype=torch.long)
    targets = torch.stack([t[0].members[0][0]] * 8)
    spread = []
    for w in (0.0, 0.5):
        cfg = dataclasses.replace(_gen_cfg(rec, 60), generator_diversity=w)
        g = train_generator(t[0], src, 2, 1, cfg, 64, tmp_path / f"d{w}.pt", seed=0)
        img, _ = sampler(g, t[0], cfg)(targets, cls, torch.Generator().manual_seed(7))
        x = img.float() / 255
        spread.append(float((x[:, None] - x[None]).abs().mean()))   # mean pairwise distance, one concept
    assert spread[1] > 1.5 * spread[0], spread


def test_generator_training_resumes_exactly(lites, tmp_path):
    from distiller.generator import train_generator
    from distiller.prompts import build_prompt_source
    rec, t = lites
    src = build_prompt_source(t[0], rec.prompts)
    whole = train_generator(t[0], src, 2, 1, _gen_cfg(rec, 6), 64, tmp_path / "whole.pt", seed=0)
    train_generator(t[0], src, 2, 1, _gen_cfg(rec, 3), 64, tmp_path / "split.pt", seed=0)   # "interrupted" at 3
    resumed = train_generator(t[0], src, 2, 1, _gen_cfg(rec, 6), 64, tmp_path / "split.pt", seed=0)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.load(tmp_path / "split.pt", weights_only=True)["step"] == 6


def test_make_with_a_generator(tmp_path):
    assert main(_make(tmp_path, "gen", "synthesis.generator_steps=3")) == 0
    run = tmp_path / "gen"
    assert torch.load(run / "generator.pt", weights_only=True)["step"] == 3
    from distiller.bank import Bank
    imgs, logits, recs = Bank(run / "bank").load()
    assert imgs.shape == (8, 64, 64, 3) and imgs.reshape(8, -1).std(0).mean() > 0.1   # 8 different images


def test_generator_with_a_clip_teacher_conditions_on_text_embeddings(tiny_clip, tmp_path):
    """CLIP targets are text embeddings (class x style), not class indices: the generator takes them as its
    condition and the make runs through to a deployable model."""
    from conftest import smoke_args
    args = smoke_args(tiny_clip, tmp_path, "clipgen", "--set", "synthesis.generator_steps=2", "--set", "synthesis.steps=1",
                      "--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]')
    assert main(args) == 0
    g = torch.load(tmp_path / "clipgen" / "generator.pt", weights_only=True)
    assert g["step"] == 2 and g["model"]["embed.weight"].dim() == 2 and "embed.bias" in g["model"]   # a Linear
    _assert_ships_a_model(tmp_path / "clipgen")


def _assert_ships_a_model(run):
    """The deployable file is one of the measured variants, eligible, on disk and loadable."""
    from runtime import Classifier
    report = json.loads((run / "report.json").read_text())
    rows = {r["file"]: r for r in report["export"]["variants"].values()}
    assert report["deployable"] in rows and rows[report["deployable"]]["eligible"] is True
    assert (run / report["deployable"]).is_file()
    assert Classifier.load(run).path == run / report["deployable"]
