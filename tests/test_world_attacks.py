"""Attacks on the trained world model, where success means something: against the unedited model an
attack reaches at least the model's own detection rate, and textual inversion brings star back from
an erasure that holds on the plain prompts.

The issue asked for the negative-prompt guard as the weak target; on the world it does not erase star
at all (pre-attack success 0.94-1.00 at guidance 2, 4 and 7.5, measured), so there is nothing for an
attack to raise, and UCE (pre-attack 0.31 on these prompts and seeds; 0.19 on the first, 7-template world
model) stands in for it. Textual inversion's test is slow-marked (600 inversion steps, 73 s on 2 cores), so
the default run's attack checks on the world are P4D's objective (test_attack_p4d.py); concept arithmetic was
tried in its place and takes minutes, not seconds."""

import pytest

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import REGISTRY, attack
from erasekit.attacks.run import make_attack
from erasekit.methods import get_method

SEEDS = range(8)
SETS = ("target", "generality")


@pytest.fixture(scope="module")
def uce_star(world_pipe):
    return get_method("uce")().fit(get_adapter(world_pipe), [erasekit.ConceptSpec("star")])


@pytest.mark.slow  # 73 s on 2 cores: the default run's 10 minutes cannot hold it (600 inversion steps)
def test_textual_inversion_brings_star_back_from_uce(world_pipe, uce_star, tmp_path):
    # the world setting (600 steps); the first world setting's 300 leave success where it was on the broad-grammar
    # model (0.31 -> 0.31 on these prompts and seeds; 600 steps: 1.00)
    r = attack(world_pipe, "star", make_attack("textual-inversion", world=True), patch=uce_star,
               seeds=SEEDS, sets=SETS, cache=tmp_path / "c")
    rates = r.rates()["all"]
    assert rates["original"]["value"] >= 0.9
    assert rates["pre_attack"]["value"] <= 0.4  # the erasure holds on most plain prompts
    assert rates["post_attack"]["value"] >= rates["pre_attack"]["value"] + 0.4, rates
    assert rates["gain"]["ci95"][0] > 0  # the gain's interval excludes zero


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_against_the_unedited_model_an_attack_reaches_its_detection_rate(name, world_pipe, tmp_path):
    r = attack(world_pipe, "star", make_attack(name, world=True), seeds=range(4), sets=SETS, cache=tmp_path / "c")
    rates = r.rates()["all"]
    assert rates["post_attack"]["value"] >= rates["original"]["value"] - 1e-9, rates
