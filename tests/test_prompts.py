"""Prompt diversification: pseudo-word splicing, Mix / Random / Contrastive sources, banks per source."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from distiller.bank import Bank, BankPlan
from distiller.synthesis import fill_bank
from distiller.concepts import parse_concepts
from distiller.prompts import (PROMPT_SOURCES, ContrastivePrompts, build_prompt_source, class_consistency, read_style_words,
                               style_diversity)
from distiller.recipe import load_recipe
from distiller.runfolder import RunPaths
from distiller.teachers import build_teacher
from distiller.teachers.textsplice import SplicedText
from runtime import UserError


@pytest.fixture(scope="module")
def recipe(tiny_clip):
    cfg, weights = tiny_clip
    return load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights), "device": "cpu"})


@pytest.fixture(scope="module")
def teacher(recipe):
    return build_teacher(recipe.teacher, parse_concepts("cats,dogs,birds"))


def _cfg(recipe, **kw):
    return dataclasses.replace(recipe.prompts, **kw)


@pytest.mark.parametrize("word", ["sketch", "painting", "cartoon"])
def test_splicing_a_word_embedding_equals_tokenising_the_word(teacher, word):
    sp = SplicedText(teacher.text_tower.model, teacher.text_tower.tokenizer)
    assert len(teacher.text_tower.tokenizer([word])[0].nonzero()) == 3  # start, the word, end: one token
    spliced = sp.encode(sp.tokens(["a * style of a cat"]), sp.word_embedding(word)[None])
    native = teacher.model.encode_text(sp.tokens([f"a {word} style of a cat"]))
    torch.testing.assert_close(spliced, native, atol=1e-5, rtol=1e-5)


def test_truncated_context_is_exact(teacher):
    sp = SplicedText(teacher.text_tower.model, teacher.text_tower.tokenizer)
    tok = sp.tokens(["a photo of a dog", "a much longer prompt about a small brown dog on grass"])
    torch.testing.assert_close(sp.encode(tok), sp.encode(tok, truncate=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sp.encode(tok), teacher.model.encode_text(tok), atol=1e-5, rtol=1e-5)


def test_style_dictionary_has_forty_words_or_more():
    words = read_style_words()
    assert len(words) >= 40 and len(set(words)) == len(words)


@pytest.mark.parametrize("name", ["plain", "mix", "random", "contrastive"])
def test_sources_shapes_and_seeded_determinism(recipe, teacher, name):
    cfg = _cfg(recipe, source=name, styles=3, train_steps=5)
    a, b = build_prompt_source(teacher, cfg, None, seed=1), build_prompt_source(teacher, cfg, None, seed=1)
    cls, sty = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 0, 0]) if name == "plain" else torch.tensor([0, 1, 2, 2])
    ta = a.targets(cls, sty, torch.Generator().manual_seed(5))
    tb = b.targets(cls, sty, torch.Generator().manual_seed(5))
    assert ta.shape == (4, teacher.text.shape[1])
    torch.testing.assert_close(ta, tb)
    assert a.num_styles == (1 if name == "plain" else 3) == len(a.style_names)
    if name == "random":  # a fresh draw per batch
        tc = a.targets(cls, sty, torch.Generator().manual_seed(6))
        assert not torch.allclose(ta, tc)
    if name in ("mix", "contrastive"):
        c = build_prompt_source(teacher, cfg, None, seed=2)
        assert not torch.allclose(a.pseudo, c.pseudo)


def _initial(src: ContrastivePrompts, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = src.splice.table.float()
    return torch.stack([table.mean(0) + table.std(0) * torch.randn(src.splice.dim, generator=g) for _ in range(n)])


def test_contrastive_training_diversifies_and_stays_on_class(recipe, teacher):
    trained = build_prompt_source(teacher, _cfg(recipe, source="contrastive", styles=6, train_steps=50), None, seed=0)
    init = _initial(trained, 6, 0)
    assert style_diversity(trained) < style_diversity(trained, init) - 0.3
    assert class_consistency(trained) >= 0.95
    mix = build_prompt_source(teacher, _cfg(recipe, source="mix", styles=6), None, seed=0)
    rnd = build_prompt_source(teacher, _cfg(recipe, source="random", styles=6), None, seed=0)
    rnd_pseudo = rnd.draw(6, torch.Generator().manual_seed(0))
    assert style_diversity(trained) < min(style_diversity(mix), style_diversity(rnd, rnd_pseudo))
    assert class_consistency(trained) >= max(class_consistency(mix), class_consistency(rnd, rnd_pseudo))

    # ablations: the diversity term is what spreads the styles; the consistency term keeps them on class
    no_div = build_prompt_source(teacher, _cfg(recipe, source="contrastive", styles=6, train_steps=50, diversity_weight=0.0), None, seed=0)
    assert style_diversity(no_div) > style_diversity(trained) + 0.2
    no_cons = build_prompt_source(teacher, _cfg(recipe, source="contrastive", styles=6, train_steps=50, consistency_weight=0.0), None, seed=0)
    assert class_consistency(no_cons) < class_consistency(trained)


def test_learned_styles_are_saved_and_reused(recipe, teacher, tmp_path, monkeypatch):
    paths = RunPaths(tmp_path)
    cfg = _cfg(recipe, source="contrastive", styles=2, train_steps=5)
    first = build_prompt_source(teacher, cfg, paths, seed=0)
    assert paths.styles.is_file()
    monkeypatch.setattr(ContrastivePrompts, "learn", lambda *a, **k: pytest.fail("styles were learned again"))
    again = build_prompt_source(teacher, cfg, paths, seed=0)
    torch.testing.assert_close(first.pseudo, again.pseudo)
    monkeypatch.undo()
    changed = build_prompt_source(teacher, _cfg(recipe, source="contrastive", styles=3, train_steps=5), paths, seed=0)
    assert changed.pseudo.shape[0] == 3  # other settings: learned anew, not reused


@pytest.mark.parametrize("name", ["plain", "mix", "random", "contrastive"])
def test_every_source_fills_a_bank(recipe, teacher, tmp_path, name):
    src = build_prompt_source(teacher, _cfg(recipe, source=name, styles=2, train_steps=5), RunPaths(tmp_path), seed=0)
    plan = BankPlan(("cats", "dogs", "birds"), tuple(src.style_names), 4, 6, teacher.input_size, 4, 0)
    bank = Bank(tmp_path / "bank")
    fill_bank(bank, plan, teacher, src, dataclasses.replace(recipe.synthesis, steps=2))
    imgs, logits, recs = bank.load()
    assert imgs.shape == (12, 64, 64, 3) and logits.shape == (12, 3)
    assert {r["style"] for r in recs} == set(range(src.num_styles))
    assert {r["class"] for r in recs} == {0, 1, 2}


def test_styles_need_a_clip_text_tower(recipe):
    class Plain:  # a teacher with class embeddings but no text tower
        text = torch.randn(2, 8)
        text_tower = None
        members = None
    with pytest.raises(UserError, match="styles do not apply to this teacher"):
        PROMPT_SOURCES.get("mix")(Plain(), _cfg(recipe, source="mix"))
    with pytest.raises(UserError, match="prompt styles do not apply"):
        build_prompt_source(Plain(), _cfg(recipe, source="mix"), None)
