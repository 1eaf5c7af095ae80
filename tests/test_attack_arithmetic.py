"""Concept arithmetic: guidance composed from the concept's other words and its neighbours, with signed
weights searched on the judge over seeds the evaluation does not use. Tiny pipelines prove the code
paths (both families, a hook edit underneath, seeding, replay, the search itself); the world checks
that a synonym term brings UCE's erased star back."""

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import Adversarial, attack
from erasekit.attacks.artefact import PROMPT_SLOT, ArithmeticHook
from erasekit.attacks.base import AttackContext, Item
from erasekit.attacks.concept_arithmetic import (ARITHMETIC_WORLD, ConceptArithmetic, ConceptArithmeticConfig,
                                                 _search_prompts)
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from erasekit.world.vocab import CONCEPTS
from tiny import RuleJudge, assert_replays, tiny_sd, tiny_sdxl, uce_edit

#: settings that run concept arithmetic in seconds on a tiny pipeline
TINY = {"trials": 4, "search_prompts": 1, "search_seeds": 1, "max_terms": 2}
SAMPLING = {"num_inference_steps": 1, "guidance_scale": 2.0}


StubJudge = RuleJudge  # reads star with the probability its rule gives


def dim(images):
    """A smooth stand-in verdict that never reads star: 0.4 times each image's mean brightness (the search
    then runs every trial, ranked by this probability)."""
    return (0.4 * (images.float().mean(dim=(1, 2, 3)) + 1) / 2).clamp(0, 1).numpy()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: two threads on two shared cores stall each other badly (every
    tiny op waits for a descheduled thread), which made a tiny attack a hundred times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd": tiny_sd(tmp_path_factory.mktemp("tok")), "sdxl": tiny_sdxl(tmp_path_factory.mktemp("tok"))}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_arithmetic_on_tiny_pipelines_is_seeded_and_replays(family, tiny, tmp_path):
    pipe = tiny[family]
    edit = uce_edit(pipe)
    runs = [attack(pipe, "star", ConceptArithmetic(**TINY), patch=edit, seeds=range(2), sets=("target",),
                   cache=tmp_path / "c", sampling=SAMPLING, judge=StubJudge(dim), seed=5) for _ in range(2)]
    r, again = runs
    adv = r.adversarial
    assert adv.prompts == [it.prompt for it in r.items] and adv.seeds == [0, 1] and not adv.tokens
    assert adv.terms == again.adversarial.terms and adv.terms[0] == (PROMPT_SLOT, 1.0)
    assert np.array_equal(r.attacked_images, again.attacked_images)
    rec = r.record
    # the search: baseline, then the candidates alone; its seeds are not the attacked images' seeds
    assert rec["trials_run"] == TINY["trials"] and rec["trials"][0]["terms"] == [[PROMPT_SLOT, 1.0]]
    assert rec["trials"][1]["terms"][1] == [rec["pool"][0]["prompt"], rec["pool"][0]["sign"]]
    assert not set(rec["search_seeds"]) & {it.seed for it in r.items} and len(rec["search_seeds"]) == 1
    kinds = {c["kind"] for c in rec["pool"]}
    assert kinds == {"concept", "neighbour"}
    assert all(c["sign"] > 0 for c in rec["pool"] if c["kind"] == "concept")
    assert all(c["sign"] < 0 for c in rec["pool"] if c["kind"] == "neighbour")
    best = max(rec["trials"], key=lambda t: (t["detected"], t["probability"]))
    assert [tuple(t) for t in best["terms"]] == adv.terms
    # the artefact saves, loads and replays the attacked images (its terms become a sampling hook)
    (tmp_path / "run").mkdir()
    adv.save(tmp_path / "run")
    back = Adversarial.load(tmp_path / "run")
    assert back.terms == adv.terms and back.prompts == adv.prompts and back.seeds == adv.seeds
    assert isinstance(back.hooks()[0], ArithmeticHook)
    assert_replays(pipe, edit, back, r, SAMPLING)


def test_arithmetic_composes_over_a_hook_edit_and_stops_when_all_search_images_succeed(tiny, tmp_path):
    pipe = tiny["sd"]
    neg = get_method("negative-prompt")().fit(get_adapter(pipe), [erasekit.ConceptSpec("star")])
    r = attack(pipe, "star", ConceptArithmetic(**TINY), patch=neg, seeds=range(1), sets=("target",),
               cache=tmp_path / "c", sampling=SAMPLING, judge=StubJudge(lambda im: np.ones(len(im))))
    assert r.record["trials_run"] == 1 and r.adversarial.terms == [(PROMPT_SLOT, 1.0)]
    assert r.detected_post.all()


def test_pool_and_search_prompts():
    spec = erasekit.ConceptSpec("star", anchor="shape", neighbours=("circle", "heart"))
    judge = StubJudge(lambda im: np.zeros(len(im)))
    items = [Item("a red star", 0, "target", None, detected_pre=True), Item("a blue star", 1, "target", None),
             Item("a pentagram", 0, "generality", None), Item("a blue star", 2, "target", None)]
    ctx = AttackContext(None, spec, "shape", "star", judge, items, {"guidance_scale": 2.0})
    pool = ConceptArithmetic(template="{}").pool(ctx)
    assert [(c.prompt, c.sign, c.kind) for c in pool] == [
        ("pentagram", 1.0, "concept"), ("asterisk", 1.0, "concept"), ("star", 1.0, "concept"),
        ("circle", -1.0, "neighbour"), ("heart", -1.0, "neighbour"), ("shape", -1.0, "anchor")]
    # without neighbours in the spec: the judge's other labels on the concept's axis
    plain = AttackContext(None, erasekit.ConceptSpec("star"), "shape", "star", judge, items, {})
    neighbours = [c.prompt for c in ConceptArithmetic(template="{}").pool(plain) if c.kind == "neighbour"]
    assert neighbours == [s for s in CONCEPTS["shape"] if s != "star"]
    capped = ConceptArithmetic(template="{}", max_neighbours=2).pool(plain)
    assert [c.prompt for c in capped if c.kind == "neighbour"] == neighbours[:2]
    assert not [c for c in ConceptArithmetic(template="{}", neighbours=False).pool(plain) if c.kind != "concept"]
    # distinct prompts, the ones still erased first, taken in turn from each set
    assert _search_prompts(ctx, 3) == ["a blue star", "a pentagram", "a red star"]


def test_world_settings_are_valid_and_cpu_sized():
    cfg = ConceptArithmeticConfig(**ARITHMETIC_WORLD)
    assert cfg.trials * cfg.search_prompts * cfg.search_seeds <= 100
    assert ConceptArithmetic.world_settings() == ARITHMETIC_WORLD
    assert ConceptArithmetic.kind == "search"


def test_bad_settings_are_one_line(tiny, tmp_path):
    for bad, match in (({"trials": 0}, "trials must be at least 1"), ({"template": "a photo"}, "template"),
                       ({"max_weight": 0.1}, "max_weight"), ({"search_seeds": 0}, "search_seeds"),
                       ({"weights": 1}, "no setting")):
        with pytest.raises(InvalidInputError, match=match) as e:
            ConceptArithmetic(**bad)
        assert "\n" not in str(e.value)
    pipe = tiny["sd"]
    with pytest.raises(InvalidInputError, match="guidance_scale > 1") as e:
        attack(pipe, "star", ConceptArithmetic(**TINY), patch=uce_edit(pipe), seeds=range(1), sets=("target",),
               cache=tmp_path / "c", sampling={"num_inference_steps": 1, "guidance_scale": 1.0},
               judge=StubJudge(dim))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_synonym_term_brings_the_erased_star_back_on_the_world(world_pipe, tmp_path):
    """Against UCE's erasure of star: adding "a photo of a pentagram" to the guidance makes the world
    classifier read star more often on the search images than the plain prompts do."""
    edit = uce_edit(world_pipe)
    r = attack(world_pipe, "star", ConceptArithmetic(trials=3, search_prompts=2, search_seeds=2), patch=edit,
               seeds=range(4), sets=("target",), cache=tmp_path / "c")
    base, synonym = r.record["trials"][0], r.record["trials"][1]
    assert synonym["terms"][1][0] == "a photo of a pentagram"
    assert synonym["probability"] > base["probability"] + 0.1
    assert r.record["best"]["detected"] > base["detected"]
