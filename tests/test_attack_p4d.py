"""P4D: PEZ-projected prompt tokens optimised through the edited model towards the unedited model's
predictions. Tiny pipelines prove the code paths (both families, both variants, a hook edit, seeding,
replay); the world proves the objective falls."""

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import Adversarial, attack
from erasekit.attacks.artefact import ids_to_vectors
from erasekit.attacks.base import AttackContext, Item
from erasekit.attacks.p4d import P4D, P4D_WORLD, P4DConfig, layout
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from tiny import assert_replays, tiny_sd, tiny_sdxl, uce_edit

#: settings that run P4D in seconds on a tiny pipeline
TINY = {"iterations": 4, "eval_every": 2, "bank": 2, "n_tokens": 3, "skip_pre": False}
SAMPLING = {"num_inference_steps": 1, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd": tiny_sd(tmp_path_factory.mktemp("tok")), "sdxl": tiny_sdxl(tmp_path_factory.mktemp("tok"))}


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    """One image cache for the world tests: the unedited and edited images are made once."""
    return tmp_path_factory.mktemp("cache")


def test_layouts_follow_the_official_token_positions():
    n = P4DConfig(n_tokens=5)
    assert layout("a red star", 2, n) == ("<adv-2>", [("<adv-2>", 5)])
    k = P4DConfig(variant="k", every_k=3)
    # six words: a token before words 1 and 4 and one at the end ([L w w w L w w w L])
    text, names = layout("a b c d e f", 0, k)
    assert text == "<adv-0.0> a b c <adv-0.1> d e f <adv-0.2>" and [c for _, c in names] == [1, 1, 1]
    text, names = layout("a b c d e f g", 1, k)
    assert text == "<adv-1.0> a b c <adv-1.1> d e f <adv-1.2> g" and len(names) == 3


@pytest.mark.parametrize("family,select", [("sd", "similarity"), ("sdxl", "objective")])
def test_p4d_on_tiny_pipelines_is_seeded_and_replays(family, select, tiny, tmp_path):
    pipe = tiny[family]
    edit = uce_edit(pipe)
    runs = [attack(pipe, "star", P4D(**TINY, select=select), patch=edit, seeds=range(2), sets=("target",), cache=tmp_path / "c",
                   sampling=SAMPLING, seed=s) for s in (3, 3)]
    r, again = runs
    adv = r.adversarial
    assert adv.prompts == ["<adv-0>", "<adv-1>"] and adv.seeds == [0, 1]
    assert adv.token_ids == again.adversarial.token_ids
    assert all(torch.equal(a, b) for n in adv.tokens for a, b in zip(adv.tokens[n], again.adversarial.tokens[n]))
    assert np.array_equal(r.attacked_images, again.attacked_images)
    adapter = get_adapter(pipe)
    for name, ids in adv.token_ids.items():
        assert len(ids) == 3
        assert all(torch.equal(a, b) for a, b in zip(adv.tokens[name], ids_to_vectors(adapter, ids)))
    assert len(adv.tokens["<adv-0>"]) == len(adapter.text_encoders())
    assert r.cost["unet_calls"] > 0 and r.record["objective_first"] > 0 and len(r.record["selected_step"]) == 2
    # the artefact saves, loads and replays the attacked images
    (tmp_path / "run").mkdir()
    adv.save(tmp_path / "run")
    back = Adversarial.load(tmp_path / "run")
    assert back.token_ids == adv.token_ids and back.prompts == adv.prompts
    with torch.no_grad():
        assert torch.equal(back.encode(adapter, back.prompts).embeds, adv.encode(adapter, adv.prompts).embeds)
    assert_replays(pipe, edit, back, r, SAMPLING)


def test_p4d_k_keeps_the_prompt_words_and_attacks_through_a_hook_edit(tiny, tmp_path):
    pipe = tiny["sd"]
    neg = get_method("negative-prompt")().fit(get_adapter(pipe), [erasekit.ConceptSpec("star")])
    r = attack(pipe, "star", P4D(**TINY, variant="k", every_k=4, select="judge"), patch=neg, seeds=range(1),
               sets=("target",), cache=tmp_path / "c", sampling=SAMPLING)
    prompt, text = r.items[0].prompt, r.adversarial.prompts[0]
    names = [w for w in text.split() if w.startswith("<adv-0.")]
    assert [w for w in text.split() if not w.startswith("<adv-")] == prompt.split()
    assert len(names) == len(prompt.split()) // 4 + 1 == len(r.adversarial.tokens)
    assert all(len(r.adversarial.token_ids[n]) == 1 for n in names)
    # each step's guarded prediction is one guided UNet call on two rows (the hook acts in the loss)
    assert r.cost["unet_rows"] >= 2 * TINY["iterations"]


def test_an_image_the_edit_already_fails_on_keeps_its_prompt(tiny):
    adapter = get_adapter(tiny["sd"])
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    items = [Item("a red star", 0, "target", blank, True, True), Item("a blue star", 1, "target", blank, True, False)]
    ctx = AttackContext(adapter, erasekit.ConceptSpec("star"), "shape", "star", None, items,
                        {"num_inference_steps": 1, "guidance_scale": 2.0})
    adv = P4D(**{**TINY, "skip_pre": True}, select="objective").run(ctx)
    assert adv.prompts == ["a red star", "<adv-1>"] and list(adv.tokens) == ["<adv-1>"]
    assert ctx.record["kept_prompts"] == 1 and ctx.record["selected_step"][0] is None


def test_similarity_selection_falls_back_to_the_concept_probability_without_an_embedding(tiny):
    from erasekit.evaluation.judges import WorldJudge

    class NoEmbedding(WorldJudge):
        def features(self, images):
            raise NotImplementedError

    adapter = get_adapter(tiny["sd"])
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    ctx = AttackContext(adapter, erasekit.ConceptSpec("star"), "shape", "star", NoEmbedding(),
                        [Item("a red star", 0, "target", blank)], {"num_inference_steps": 1, "guidance_scale": 2.0})
    adv = P4D(**TINY).run(ctx)
    assert adv.prompts == ["<adv-0>"] and 0 <= ctx.record["selection_score"][0] <= 1


def test_p4d_objective_falls_on_the_world(world_pipe, world_cache):
    """Against UCE's erasure of star, with the world's step size: the loss over the same bank of (x_t, t)
    falls from the first passes to the last (a fixed bank of 6 draws, cycled ten times)."""
    edit = uce_edit(world_pipe)
    cfg = {**P4D_WORLD, "iterations": 60, "bank": 6, "eval_every": 30, "select": "objective"}
    r = attack(world_pipe, "star", P4D(**cfg), patch=edit, seeds=range(1), sets=("target",), cache=world_cache)
    passes = r.record["objective_by_pass"]
    assert len(passes) == 10
    assert np.mean(passes[-3:]) < 0.6 * np.mean(passes[:2])
    assert r.record["objective_by_tenth"][-1] < r.record["objective_by_tenth"][0]


def test_world_settings_are_valid_and_cpu_sized():
    cfg = P4DConfig(**P4D_WORLD)
    assert cfg.iterations <= 300 and cfg.bank <= cfg.iterations
    assert P4D.world_settings() == P4D_WORLD


def test_bad_settings_are_one_line(world_pipe, world_cache):
    with pytest.raises(InvalidInputError, match="iterations must be at least 1"):
        P4D(iterations=0)
    with pytest.raises(InvalidInputError, match="variant"):
        P4D(variant="x")
    with pytest.raises(InvalidInputError, match="no setting"):
        P4D(prompt_len=3)
    edit = uce_edit(world_pipe)
    kw = {"patch": edit, "seeds": range(1), "sets": ("target",), "cache": world_cache}
    with pytest.raises(InvalidInputError, match="reads 20") as e:  # the world's text encoder reads 20 tokens
        attack(world_pipe, "star", P4D(n_tokens=19, iterations=1), **kw)
    assert "\n" not in str(e.value)
    # P4D-K on a 14-word prompt: a token every word makes 29 tokens with the start and end ones
    long = "an image of a pink star with a striped texture over a white background"
    ctx = AttackContext(get_adapter(world_pipe), erasekit.ConceptSpec("star"), "shape", "star", None,
                        [Item(long, 0, "target", None)], {})
    with pytest.raises(InvalidInputError, match="raise every_k") as e:
        P4D(variant="k", every_k=1).check(ctx)
    assert "\n" not in str(e.value)
    P4D(variant="k", every_k=5).check(ctx)  # 14 + 3 + 2 tokens fit
