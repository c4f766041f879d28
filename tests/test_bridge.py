"""CLIP students: each concept's head from WordNet rows, the CLIP bridge to ImageNet classes, or a fresh row;
the cache of the 1000 classes' text embeddings; the judge per head source; "as initialised" kept when KD hurts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distiller.bridge import HeadSource, bridge, class_text_embeddings, decide_heads
from distiller.cli import main
from distiller.concepts import parse_concepts
from distiller.imagenet_concepts import class_names
from distiller.recipe import load_recipe
from distiller.students import create_student, student_spec


def _classes(seed=0, d=64):
    return F.normalize(torch.randn(1000, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_a_concept_equal_to_a_class_ranks_that_class_first():
    classes = _classes()
    concept = classes[[417]].clone()
    found = bridge(concept, classes, 100.0, 0.5, [True])[0]
    assert found["classes"][0] == 417 and found["similarity"][0] == pytest.approx(1.0)
    assert found["nearest"][0] == 417
    # weights: softmax(scale x cosine) over the candidates, so the identical class dominates
    w = np.exp(found["log_weights"])
    assert w.sum() == pytest.approx(1.0) and w[0] == w.max()
    expect = torch.softmax(100.0 * torch.tensor(found["similarity"]), 0)
    np.testing.assert_allclose(w, expect.numpy(), rtol=1e-5)


def test_a_class_nearer_another_concept_goes_to_that_concept():
    classes = _classes()
    a = F.normalize(classes[10] + 0.6 * classes[11], dim=0)        # near 10 and 11
    b = F.normalize(classes[11] + 0.2 * classes[12], dim=0)        # nearer 11 than a is
    found = bridge(torch.stack([a, b]), classes, 100.0, 0.3, [True, True])
    assert 10 in found[0]["classes"] and 11 not in found[0]["classes"]
    assert 11 in found[1]["classes"]
    assert not set(found[0]["classes"]) & set(found[1]["classes"])
    # classes owned elsewhere (a WordNet concept's) are never bridged
    assert 10 not in bridge(a[None], classes, 100.0, 0.3, [True], owned={10})[0]["classes"]


def test_the_margin_sends_a_concept_to_fresh():
    classes = _classes()
    concepts = parse_concepts("zorblax,florbit")
    text = torch.stack([classes[5], F.normalize(classes[6] + classes[7], dim=0)])
    loose = decide_heads(concepts, "auto", text, classes, 100.0, 0.6)
    assert [h.source for h in loose] == ["clip", "clip"]
    strict = decide_heads(concepts, "auto", text, classes, 100.0, 0.99)
    assert [h.source for h in strict] == ["clip", "fresh"]          # florbit's best cosine is ~0.71
    assert strict[1].classes == () and strict[1].nearest[0] in (6, 7) and strict[1].nearest_similarity[0] < 0.99
    with pytest.raises(Exception, match="florbit"):
        decide_heads(concepts, "imagenet", text, classes, 100.0, 0.99)   # imagenet: no fresh rows allowed


def test_wordnet_takes_priority_over_clip():
    classes = _classes()
    concepts = parse_concepts("cat,zorblax")
    text = torch.stack([classes[900], classes[901]])                # cat's text sits exactly on class 900
    heads = decide_heads(concepts, "auto", text, classes, 100.0, 0.5)
    names = class_names()
    assert heads[0].source == "wordnet" and [names[i] for i in heads[0].classes][:2] == ["tabby", "tiger cat"]
    assert heads[1].source == "clip" and heads[1].classes[0] == 901
    assert not set(heads[0].classes) & set(heads[1].classes)
    assert heads[0].to_json()["similarity"] is None and heads[1].to_json()["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_one_model_mixes_wordnet_clip_and_fresh_heads():
    """cat: its WordNet rows pooled; kitten: a weighted logsumexp of crafted CLIP neighbours; zorblax: a new row."""
    concepts = parse_concepts("cat,kitten,zorblax")
    kitten = HeadSource("kitten", "clip", (151, 152), tuple(np.log([0.75, 0.25]).tolist()), (0.9, 0.8))
    heads = decide_heads(concepts[:1]) + [kitten, HeadSource("zorblax", "fresh")]
    spec = student_spec(load_recipe("cpu"), concepts, heads)
    assert spec.fresh_outputs == (2,) and not spec.pooled
    student = create_student(spec, "pretrained").eval()
    from distiller.teachers.imagenet import lite_model
    lite0 = lite_model("efficientnet-lite0").eval()
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out, full = student(x), lite0(x)
    torch.testing.assert_close(out[:, 0], torch.logsumexp(full[:, list(heads[0].classes)], 1), atol=1e-4, rtol=1e-4)
    manual = torch.log(0.75 * full[:, 151].exp() + 0.25 * full[:, 152].exp())
    torch.testing.assert_close(out[:, 1], manual, atol=1e-4, rtol=1e-4)
    assert out.shape == (3, 4)        # cat, kitten, zorblax and "other" (open-set by default)
    rest = sorted(set(range(1000)) - set(heads[0].classes) - {151, 152})
    torch.testing.assert_close(out[:, 3], torch.logsumexp(full[:, rest], 1), atol=1e-4, rtol=1e-4)


def test_the_probe_fits_fresh_rows_and_leaves_pooled_ones(tmp_path):
    from distiller.probe import fit_head
    concepts = parse_concepts("cat,zorblax")
    heads = decide_heads(concepts[:1]) + [HeadSource("zorblax", "fresh")]
    rec = load_recipe("cpu", {"distill.probe_steps": 200, "distill.probe_weight_decay": [0.01]})
    spec = student_spec(rec, concepts, heads)
    student = create_student(spec, "pretrained")
    images = (np.random.default_rng(0).random((12, 64, 64, 3)) * 255).astype(np.uint8)
    row = student.head.bounds[1][0]                                      # zorblax's one fresh row
    w = student.head.fc.weight
    pooled_before = torch.cat([w[:row], w[row + 1:]]).clone()           # cat's rows and "other"'s (open-set)
    fresh_before = w[row].clone()
    logits = np.tile(np.array([[0.0, 4.0, 0.0]], np.float32), (12, 1))    # the teacher says zorblax everywhere
    from distiller.distill import student_logits
    before = student_logits(student, spec, images)
    fit_head(student, spec, images, logits, np.ones(12, np.float32), rec.distill)
    w = student.head.fc.weight
    torch.testing.assert_close(torch.cat([w[:row], w[row + 1:]]), pooled_before)
    assert not torch.equal(w[row], fresh_before)
    after = student_logits(student, spec, images)
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]])      # pooled outputs: as they were
    assert (after[:, 1] > before[:, 1] + 1.0).all()                       # the fresh row learnt towards zorblax


def test_the_text_embedding_cache_is_reused_and_follows_the_teacher(tiny_clip, tmp_path, monkeypatch):
    import dataclasses

    from distiller.recipe import default_recipe
    from distiller.teachers import build_teacher
    from distiller.testing import make_tiny_clip
    from distiller.teachers.textsplice import SplicedText
    cfg, weights = tiny_clip
    tpl = ("a photo of a {}.", "a drawing of a {}.")
    concepts = parse_concepts("cat,dog")
    teacher = build_teacher(dataclasses.replace(default_recipe().teacher, model=str(cfg), pretrained=str(weights), templates=tpl), concepts)
    first = class_text_embeddings(teacher.text_tower, str(cfg), str(weights), tpl, folder=tmp_path)
    assert first.shape == (1000, 32) and torch.allclose(first.norm(dim=-1), torch.ones(1000), atol=1e-5)
    # the cached embedding is each class's normalised mean of its normalised template embeddings
    from distiller.teachers.clip import encode_class_texts
    from distiller.concepts import Concept
    some = [Concept(n, n) for n in class_names()[:3]]
    torch.testing.assert_close(first[:3], encode_class_texts(teacher.model, teacher.text_tower.tokenizer, some, tpl),
                               atol=1e-5, rtol=1e-5)
    calls = []
    real_encode = SplicedText.encode
    monkeypatch.setattr(SplicedText, "encode", lambda self, *a, **k: calls.append(1) or real_encode(self, *a, **k))
    again = class_text_embeddings(teacher.text_tower, str(cfg), str(weights), tpl, folder=tmp_path)
    assert calls == [] and torch.equal(again, first)                   # reused: nothing encoded
    _, other = make_tiny_clip(tmp_path / "other", seed=1)                # another teacher's weights
    t2 = build_teacher(dataclasses.replace(default_recipe().teacher, model=str(cfg), pretrained=str(other), templates=tpl), concepts)
    changed = class_text_embeddings(t2.text_tower, str(cfg), str(other), tpl, folder=tmp_path)
    assert calls and not torch.allclose(changed, first)
    assert len(list((tmp_path / "imagenet_text").iterdir())) == 2
    class_text_embeddings(teacher.text_tower, str(cfg), str(weights), tpl[:1], folder=tmp_path)   # templates too
    assert len(list((tmp_path / "imagenet_text").iterdir())) == 3


def test_the_judge_is_chosen_per_head_source(tiny_clip):
    from distiller.judge import assignments
    cfg, weights = tiny_clip
    concepts = parse_concepts("cat,kitten,zorblax")
    heads = [HeadSource("cat", "wordnet", (281,)), HeadSource("kitten", "clip", (282,)), HeadSource("zorblax", "fresh")]
    rec = load_recipe("cpu", {"teacher.model": str(cfg), "teacher.pretrained": str(weights)})
    plan = assignments(rec, concepts, heads, student_network="efficientnet-lite0")
    assert [(a.kind, a.name, a.concepts) for a in plan] == [("pooled", "efficientnet-lite1", (0, 1)), ("self", str(cfg), (2,))]
    # never the student's own network nor one that made the bank
    plan = assignments(rec, concepts, heads, used=("efficientnet-lite2",), student_network="efficientnet-lite1")
    assert plan[0].name == "efficientnet-lite0"
    assert assignments(rec.replace({"teacher.judge": "none"}), concepts, heads) == []
    # an ImageNet teacher keeps one network over every concept
    lite = load_recipe("cpu-imagenet")
    two = parse_concepts("cats,dogs")
    assert [(a.kind, a.name, a.concepts) for a in assignments(lite, two, decide_heads(two))] == [
        ("network", "efficientnet-lite0", (0, 1))]
    from distiller.judge import held_out_templates
    assert not set(held_out_templates(rec.teacher.templates)) & set(rec.teacher.templates)


def test_as_initialised_wins_when_kd_lowers_the_deciding_signal(tmp_path):
    """KD on labels that contradict what the held-out judge confirmed: every trained epoch scores lower on the
    judge's images, so the student as initialised (epoch 0) ships, and the history says which signal chose."""
    from distiller.distill import TransferSet, train_student
    rec = load_recipe("smoke", {"openset": False, "student.input_size": 32, "distill.epochs": 3, "distill.batch_size": 4,
                                "distill.lr": 0.01, "distill.warmup_epochs": 0})
    spec = student_spec(rec, parse_concepts("cats,dogs"))
    torch.manual_seed(0)
    student = create_student(spec)
    with torch.no_grad():
        student.get_classifier().bias.copy_(torch.tensor([3.0, -3.0]))   # as initialised: class 0 everywhere
    rng = np.random.default_rng(0)
    im = (rng.random((16, 32, 32, 3)) * 255).astype(np.uint8)
    ones = np.tile(np.array([[-6.0, 6.0]], np.float32), (16, 1))        # the teacher's KD targets: class 1
    zeros = -ones                                                        # the judge confirmed class 0
    data = TransferSet(im, ones, np.ones(16, np.float32), {"surrogate": (im[:8], ones[:8]), "judge": (im[:8], zeros[:8])})
    assert data.selector == "judge"
    hist = train_student(student, spec, data, rec.distill, tmp_path, 0)
    assert [h["selected_on"] for h in hist] == ["judge"] * 4
    assert hist[0]["val_agreement_judge"] == 1.0 and hist[0]["val_agreement_surrogate"] == 0.0
    assert max(h["val_agreement_surrogate"] for h in hist[1:]) == 1.0    # KD did learn the teacher's labels...
    assert all(h["val_agreement_judge"] < 1.0 for h in hist[1:])          # ...and lost the judge's
    from distiller.distill import Checkpoints
    assert torch.load(Checkpoints(tmp_path).best, weights_only=True)["epoch"] == 0


def test_an_uncached_clip_teacher_names_the_file_and_the_offline_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    code = main(["make", "--classes", "cat,dog", "--teacher", "ViT-B-32", "--offline", "--out", str(tmp_path / "runs")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--pretrained FILE" in err and "--teacher efficientnet-lite2" in err
    assert not (tmp_path / "runs").exists()


def test_cpu_recipe_with_a_clip_teacher_ships_a_pretrained_student_with_a_head_per_concept(tiny_clip, tmp_path, capsys,
                                                                                       monkeypatch):
    """The issue's call: the cpu recipe sized down, the tiny random CLIP teacher, a WordNet word and a made-up one."""
    monkeypatch.setenv("DISTILLER_CACHE", str(tmp_path / "cache"))
    cfg, weights = tiny_clip
    args = ["make", "--classes", "cat,zorblax", "--teacher", str(cfg), "--pretrained", str(weights), "--recipe", "cpu",
            "--set", "synthesis.images_per_class=8", "--set", "synthesis.steps=3", "--set", "prompts.train_steps=5",
            "--set", "distill.epochs=1", "--set", 'export.variants=["onnx-fp32"]', "--out", str(tmp_path), "--name", "r"]
    assert main(args) == 0
    out = capsys.readouterr()
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    st = report["student"]
    assert st["init"] == "pretrained" and st["model"] == "tf_efficientnet_lite0" and st["input_size"] == 128
    assert {"model", "input_size", "best_val_agreement", "epochs"} <= set(st)
    assert set(st["head"]) == {"cat", "zorblax"}
    assert st["head"]["cat"]["source"] == "wordnet" and "tabby" in st["head"]["cat"]["classes"]
    assert st["head"]["zorblax"]["source"] in ("clip", "fresh")
    judge = report["judge"]
    assert judge and set(judge["per_concept"]) == {"cat", "zorblax"} and set(judge["judges"]) == {"cat", "zorblax"}
    assert "efficientnet-lite1" in judge["judge"]
    assert st["selected_on"] in ("judge", "surrogate") and "chosen on" in " ".join(out.out.split())
    assert (tmp_path / "cache" / "imagenet_text").is_dir()      # the 1000 classes' embeddings, cached for the next run
    # the exported model answers with both labels and runs without torch-side code
    from runtime import Classifier
    clf = Classifier.load(tmp_path / "r")
    assert list(clf.labels) == ["cat", "zorblax"]


def test_the_judge_signal_needs_confirmed_images_of_every_concept(smoke_run):
    """A judge that confirms one concept's images only would let a student answering that concept win."""
    from distiller.bank import Bank
    from distiller.distill import transfer_set
    bank = Bank(smoke_run / "bank")
    cfg = load_recipe("smoke").distill
    _, _, val = bank.load("val")
    dogs = {r["index"] for r in val if r["class"] == 1}
    assert "judge" not in transfer_set(bank, None, cfg, dogs).val
    some = dogs | {next(r["index"] for r in val if r["class"] == 0)}
    data = transfer_set(bank, None, cfg, some)
    assert data.selector == "judge" and len(data.val["judge"][0]) == len(some)
    assert sorted(data.val["judge"][1].argmax(1).tolist()) == sorted(r["class"] for r in val if r["index"] in some)


def test_a_fresh_head_the_user_asked_for_is_not_blamed_on_imagenet():
    from distiller.bridge import fresh_warning
    h = HeadSource("bird", "fresh", nearest=(10,), nearest_similarity=(0.5,))
    assert "no ImageNet class" in fresh_warning(h, 0.85) and "below student.bridge_min_similarity" in fresh_warning(h, 0.85)
    asked = fresh_warning(h, 0.85, asked=True)
    assert asked.startswith("bird: student.head = fresh") and "no ImageNet class" not in asked and "--images DIR" in asked
