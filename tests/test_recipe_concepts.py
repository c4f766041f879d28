"""Recipes (typed TOML, overrides, written back) and concept parsing."""
from __future__ import annotations

from distiller.recipe import tomllib

import pytest

from distiller.concepts import Concept, parse_concepts, singular
from distiller.recipe import default_recipe, load_recipe, parse_set, recipe_from_dict, recipe_names
from runtime.registry import Registry
from runtime import UserError


def test_shipped_recipes_load_and_say_everything():
    from distiller.recipe import RECIPE_DIRS
    assert {"smoke", "cpu", "gpu", "cpu-imagenet"} <= set(recipe_names())
    base_text = (RECIPE_DIRS[0] / "cpu.toml").read_text()
    base = tomllib.loads(base_text)
    assert "base" not in base and "#" in base_text
    for name in ("smoke", "cpu", "gpu", "cpu-imagenet"):
        r = load_recipe(name)
        assert r.name == name
        text = (RECIPE_DIRS[0] / f"{name}.toml").read_text()
        data = tomllib.loads(text)
        assert "#" in text  # commented
        # the base recipe writes every setting of the dataclass tree; the others only what differs from it
        for section, cfg in r.to_dict().items():
            if isinstance(cfg, dict):
                assert set(cfg) == set(base[section]), ("cpu", section, set(cfg) ^ set(base[section]))
                if name != "cpu":
                    assert data.get("base") == "cpu"
                    same = [k for k, v in data.get(section, {}).items() if base[section][k] == v]
                    assert not same, (name, section, same)
                    merged = {**base[section], **data.get(section, {})}
                    assert recipe_from_dict({**r.to_dict(), section: merged}) == r
    assert load_recipe("gpu").distill.relabel is True and load_recipe("gpu").device == "cuda"


def test_a_recipe_extends_its_base_and_the_run_keeps_it_resolved(tmp_path):
    (tmp_path / "mine.toml").write_text('base = "smoke"\nname = "mine"\n[synthesis]\nsteps = 3\n')
    r = load_recipe(str(tmp_path / "mine.toml"))
    smoke = load_recipe("smoke")
    assert r.synthesis.steps == 3 and r.name == "mine"
    assert r.synthesis.shard_size == smoke.synthesis.shard_size and r.student == smoke.student
    assert "base" not in r.to_toml() and "shard_size = 12" in r.to_toml()   # written into a run fully resolved
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(UserError, match="loop"):
        load_recipe(str(tmp_path / "loop.toml"))


def test_overrides_types_and_round_trip():
    r = load_recipe("smoke", {"synthesis.steps": 3, "seed": 7, "teacher.templates": ["x {}."], "distill.crop_scale": [0.5, 1]})
    assert r.synthesis.steps == 3 and r.seed == 7 and r.teacher.templates == ("x {}.",)
    assert r.distill.crop_scale == (0.5, 1.0)
    assert recipe_from_dict(tomllib.loads(r.to_toml())) == r
    with pytest.raises(UserError, match="must be a whole number"):
        load_recipe("smoke", {"synthesis.steps": 2.5})
    with pytest.raises(UserError, match="must be true or false"):
        load_recipe("smoke", {"distill.relabel": "yes"})
    with pytest.raises(UserError, match="unknown recipe key 'synthesys.steps'"):
        load_recipe("smoke", {"synthesys.steps": 1})
    with pytest.raises(dataclasses_frozen()):
        r.seed = 3  # frozen


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_parse_set_reads_toml_values():
    assert parse_set(["a.b=3", "c=0.5", "d=true", "e=hello", "f=[1, 2]"]) == {"a.b": 3, "c": 0.5, "d": True, "e": "hello", "f": [1, 2]}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_set(["novalue"])


def test_recipe_file_path_and_errors(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('seed = 5\n[synthesis]\nsteps = 2\n')
    r = load_recipe(str(p))
    assert r.name == "mine" and r.seed == 5 and r.synthesis.steps == 2 and r.distill == default_recipe().distill
    p.write_text("seed = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(str(p))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.toml"))


def test_concepts_singularised_for_the_teacher_labels_kept():
    cs = parse_concepts(" cats , dogs,golden retrievers, glass,bus ")
    assert [c.label for c in cs] == ["cats", "dogs", "golden retrievers", "glass", "bus"]
    assert [c.text for c in cs] == ["cat", "dog", "golden retriever", "glass", "bus"]
    assert parse_concepts("cats=a tabby cat,dogs") == [Concept("cats", "a tabby cat"), Concept("dogs", "dog")]
    assert singular("mice") == "mouse" and singular("people") == "person"


def test_concepts_from_file_and_errors(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncats\n\ndogs\n")
    assert [c.label for c in parse_concepts(file=f)] == ["cats", "dogs"]
    with pytest.raises(UserError, match="same class"):
        parse_concepts("Cats,cat")
    with pytest.raises(UserError, match="at least 2"):
        parse_concepts("cats")
    with pytest.raises(UserError, match="one of them"):
        parse_concepts("a,b", file=f)
    with pytest.raises(UserError, match="label=teacher text"):
        parse_concepts("cats=,dogs")


def test_registry_names_near_matches():
    reg = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    assert reg.get("alpha") == 1 and reg.names() == ["alpha", "beta"]
    with pytest.raises(UserError, match="unknown widget 'alpa': did you mean alpha"):
        reg.get("alpa")
    with pytest.raises(ValueError):
        reg.register("alpha", 3)
