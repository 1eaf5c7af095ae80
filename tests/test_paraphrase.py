"""The paraphrase prompt family: a grammar disjoint from the world's training captions and from
every method's erase templates, that fits the world tokenizer, and reaches metrics and report."""

import dataclasses
import itertools
import json
import random
import re
from pathlib import Path

import pytest

from erasekit.concepts import ConceptSpec
from erasekit.evaluation.paraphrase import FRAMES, frame_of, frames, paraphrase
from erasekit.evaluation.prompts import world_prompt_sets
from erasekit.world.vocab import AXES, BROAD_TEMPLATES, CONCEPTS, GRAMMARS, TEMPLATES, all_words, caption, erase_templates

TOKENIZER = Path(__file__).resolve().parents[1] / "src/erasekit/world/assets/world-model/tokenizer"


def all_paraphrases():
    """Every paraphrase prompt the evaluation can write: each concept as target, with each of its
    synonyms for generality, on several seeds."""
    out = set()
    for axis in AXES:
        for label in CONCEPTS[axis]:
            for seed in range(3):
                for ps in world_prompt_sets(ConceptSpec(label), axis, label, 48, seed, family="paraphrase").values():
                    out.update(ps.prompts)
    return out


def training_frames(grammar: str = "templates"):
    """Frames of every caption a training grammar can write: each template with each subset of
    axes left out (the masked words make the choice of values and synonyms irrelevant)."""
    rng = random.Random(0)
    out = set()
    for t in range(len(GRAMMARS[grammar])):
        for keep in itertools.product([True, False], repeat=len(AXES)):
            lab = {a: (next(iter(CONCEPTS[a])) if k else None) for a, k in zip(AXES, keep)}
            for synonym_p in (0.0, 1.0):
                out.add(frame_of(caption(lab, rng, template=t, synonym_p=synonym_p, grammar=grammar)))
    return out


def erase_template_frames():
    """Frames of every erase template: the world's per axis, and every registered method's
    default templates (closed-form ``templates``, guards' ``template``)."""
    from erasekit.methods import REGISTRY

    texts = [t for axis in AXES for t in erase_templates(axis)]
    for cls in REGISTRY.values():
        for f in dataclasses.fields(cls.Config):
            if f.name in ("templates", "template"):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                texts += [default] if isinstance(default, str) else list(default)
    assert len(texts) > 40
    return {frame_of(t) for t in texts}


def test_frames_are_disjoint_from_training_captions_and_erase_templates():
    mine = frames()
    assert len(mine) == len(FRAMES) >= 12  # every frame is a different sentence
    assert not mine & training_frames()
    assert not mine & erase_template_frames()
    # every prompt the family writes, not just the frames filled with canonical words
    assert {frame_of(p) for p in all_paraphrases()} == mine


def test_the_broad_training_grammar_stays_clear_of_the_paraphrase_family():
    """A world model retrained on the broad grammar must still meet the paraphrases as unseen
    phrasings: no broad caption, with any axes left out, has a paraphrase frame."""
    broad = training_frames("broad")
    assert training_frames() < broad and len(BROAD_TEMPLATES) >= 40
    assert not broad & frames()
    rng = random.Random(2)
    captions = {caption({a: rng.choice(list(CONCEPTS[a])) for a in AXES}, rng, synonym_p=0.5, drop_p=0.2,
                        grammar="broad") for _ in range(20000)}
    assert not captions & all_paraphrases()


def test_the_broad_grammar_fits_its_tokenizer_which_is_the_shipped_one(tmp_path):
    from erasekit.world.tokenizer import make_tokenizer
    from erasekit.world.train import MAX_TOKENS

    assert set(all_words("templates")) < set(all_words("broad")) == set(all_words())
    tok = make_tokenizer(tmp_path / "broad", model_max_length=MAX_TOKENS, words=all_words("broad"))
    assert all(len(tok(w).input_ids) == 3 for w in all_words("broad"))  # every word one token
    rng = random.Random(3)
    longest = 0
    for t in range(len(BROAD_TEMPLATES)):
        for _ in range(20):  # the longest synonyms differ in letters, not tokens
            lab = {a: rng.choice(list(CONCEPTS[a])) for a in AXES}
            longest = max(longest, len(tok(caption(lab, rng, template=t, grammar="broad")).input_ids))
    assert longest <= MAX_TOKENS, longest
    shipped = json.loads((TOKENIZER / "vocab.json").read_text())
    make_tokenizer(tmp_path / "default")  # the default words are the shipped model's: the broad grammar's
    assert json.loads((tmp_path / "default" / "vocab.json").read_text()) == shipped
    with pytest.raises(Exception, match="unknown caption grammar"):
        caption({"shape": "star"}, rng, grammar="english")


@pytest.mark.parametrize("synonyms", [False, True])
def test_fidelity_prompts_in_the_paraphrase_family(synonyms):
    """The retraining bar's prompts: held-out combinations in paraphrase frames, every axis named by a
    word of its true value (a synonym when asked), the same combinations as the templated prompts."""
    from erasekit.world.train import fidelity_prompts
    from erasekit.world.vocab import canonical_of

    para = fidelity_prompts(64, 5, synonyms=synonyms, family="paraphrase")
    templ = fidelity_prompts(64, 5, synonyms=synonyms)
    assert [lab for _, lab in para] == [lab for _, lab in templ]
    assert {frame_of(p) for p, _ in para} == frames()
    for p, lab in para:
        named = {}
        for w in re.findall(r"[a-z]+", p):
            for a in AXES:
                try:
                    named[a] = canonical_of(a, w)
                except KeyError:
                    pass
        assert named == lab.as_dict(), p
        said = set(re.findall(r"[a-z]+", p))
        canonical = set(lab.as_dict().values())
        assert (not canonical & said) if synonyms else canonical <= said, p


def test_no_training_caption_is_a_paraphrase():
    rng = random.Random(1)
    captions = {caption({a: rng.choice(list(CONCEPTS[a])) for a in AXES}, rng, synonym_p=0.5, drop_p=0.2)
                for _ in range(20000)}
    assert len(captions) > 5000
    assert not captions & all_paraphrases()


def test_the_disjointness_check_can_fail():
    """frame_of sees through values, synonyms, articles, case and punctuation."""
    assert frame_of("A striped Amber orb, on a lawn background!") == frame_of("a dotted red star on a grass background")
    assert frame_of("an image of a {}") in erase_template_frames()
    assert frame_of("a photo of a red striped star against a sky backdrop") in training_frames()
    assert frame_of("could you draw a red star?") != frame_of("could you draw a red star on grass?")


def test_every_paraphrase_fits_the_world_tokenizer():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    longest = max(len(tok(p).input_ids) for p in all_paraphrases())
    assert longest <= tok.model_max_length, longest


def test_paraphrase_sets_mirror_the_templated_ones():
    spec = ConceptSpec("star")
    para = world_prompt_sets(spec, "shape", "star", 48, family="paraphrase")
    templ = world_prompt_sets(spec, "shape", "star", 48)
    assert set(para) == set(templ) == {"target", "generality", "neighbours", "unrelated"}
    assert all(set(lab) == set(AXES) for ps in para.values() for lab in ps.labels)
    assert all(lab["shape"] == "star" for lab in para["target"].labels)
    assert {lab["shape"] for lab in para["neighbours"].labels} == set(CONCEPTS["shape"]) - {"star"}
    assert all(("pentagram" in p) or ("asterisk" in p) for p in para["generality"].prompts)
    assert all(" star" not in p for p in para["generality"].prompts)
    assert len({frame_of(p) for p in para["target"].prompts}) == len(FRAMES)  # 48 prompts: every frame, 3 times
    # labels agree with the words: each prompt names its own label's values
    for ps in (para["target"], para["neighbours"]):
        for text, lab in zip(ps.prompts, ps.labels):
            assert all(re.search(rf"\b{v}\b", text) for v in lab.values()), (text, lab)
    assert paraphrase({"shape": "orb", "colour": "orange", "texture": "solid", "background": "ivory"}, 0) == \
        "could you draw a solid orange orb on ivory?"
    assert paraphrase({"shape": "orb", "colour": "amber", "texture": "solid", "background": "sky"}, 1).startswith(
        "i'd like an amber orb")
    with pytest.raises(Exception, match="unknown prompt family"):
        world_prompt_sets(spec, "shape", "star", 4, family="slang")


def test_paraphrase_family_reaches_metrics_json_and_the_report(tmp_path):
    from test_evaluation import RenderPipe

    from erasekit.evaluation import ImageCache, evaluate
    from erasekit.evaluation.report import render_report

    res = evaluate(RenderPipe(replace={"star": "circle"}), "star", seeds=range(16), cache=ImageCache(tmp_path),
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0})
    c = res.concepts[0]
    assert c.paraphrase is not None and c.paraphrase.keys() >= {"efficacy_patched", "harmonic", "harmonic_ci95",
                                                                "specificity_collateral_patched"}
    d = json.loads(res.to_json())["concepts"][0]
    assert set(d["families"]) == {"templated", "paraphrase"}
    assert d["families"]["paraphrase"]["H"]["ci95"] == c.paraphrase["harmonic_ci95"]
    assert d["paraphrase_metrics"]["efficacy_original"]["n"] == 16
    assert all(p in FRAMES or frame_of(p) in frames() for p in d["prompts"]["paraphrase/target"])
    settings = json.loads(res.to_json())["settings"]
    assert "paraphrase" in settings["prompt_families"] and settings["bootstrap"]["unit"] == "prompt"
    html = render_report(res)
    for needle in ("family-templated", "family-paraphrase", "paraphrase prompts", "set-paraphrase-target",
                   "set-paraphrase-generality", "set-paraphrase-neighbours", "set-paraphrase-unrelated",
                   "cluster bootstrap", "Wilson"):
        assert needle in html, needle
    # turned off: no family, and the report says so
    off = evaluate(RenderPipe(), "star", seeds=range(4), cache=ImageCache(tmp_path), paraphrase=False,
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0})
    assert off.concepts[0].paraphrase is None and "paraphrase_metrics" not in json.loads(off.to_json())["concepts"][0]
    assert "No paraphrase family" in render_report(off)
