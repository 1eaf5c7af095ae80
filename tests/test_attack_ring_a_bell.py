"""Ring-A-Bell: a concept vector from prompt pairs and a genetic search over token ids whose encoding
approaches the prompt's plus the concept vector. Text encoder only: no UNet call."""

import itertools

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import Adversarial, attack
from erasekit.attacks.artefact import ids_to_vectors
from erasekit.attacks.ring_a_bell import (RAB_WORLD, RingABell, RingABellConfig, concept_pairs, concept_vector,
                                          encode_ids, fitness, genetic_search, vocabulary)
from erasekit.errors import InvalidInputError
from erasekit.generate import generate
from tiny import tiny_sd, tiny_sdxl, uce_edit

#: settings that run Ring-A-Bell in a second on a tiny pipeline
TINY = {"length": 4, "population": 8, "generations": 5}
SAMPLING = {"num_inference_steps": 1, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd": tiny_sd(tmp_path_factory.mktemp("tok")), "sdxl": tiny_sdxl(tmp_path_factory.mktemp("tok"))}


def target_of(adapter, prompts, i, eta, neutral="object"):
    """The attack's target for prompt i, computed here from the pairs written by hand."""
    pairs = [(p, p.replace("star", neutral, 1)) for p in dict.fromkeys(prompts)]
    with torch.no_grad():
        own = adapter.encode([prompts[i]]).embeds[0].float()
    return own + eta * concept_vector(adapter, pairs)


def test_vocabulary_leaves_out_special_tokens(world_pipe):
    adapter = get_adapter(world_pipe)
    tok = world_pipe.tokenizer
    v = vocabulary(adapter).tolist()
    assert tok.bos_token_id not in v and tok.eos_token_id not in v and len(v) == len(tok) - 2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_ring_a_bell_on_tiny_pipelines_is_seeded_and_replays(family, tiny, tmp_path):
    pipe = tiny[family]
    edit = uce_edit(pipe)
    adapter = get_adapter(pipe)
    runs = [attack(pipe, "star", RingABell(**TINY), patch=edit, seeds=range(2), sets=("target",),
                   cache=tmp_path / "c", sampling=SAMPLING) for _ in range(2)]
    r, again = runs
    adv = r.adversarial
    assert r.cost["unet_calls"] == 0
    assert adv.prompts == ["<adv-0>", "<adv-1>"] and adv.token_ids == again.adversarial.token_ids
    assert np.array_equal(r.attacked_images, again.attacked_images)
    assert r.record["concept_pairs"] == 2
    prompts = [it.prompt for it in r.items]
    for i, name in enumerate(adv.prompts):
        ids = adv.token_ids[name]
        assert len(ids) == 4 and all(torch.equal(a, b) for a, b in zip(adv.tokens[name], ids_to_vectors(adapter, ids)))
        with torch.no_grad():
            replay = adv.encode(adapter, [name]).embeds
            searched = encode_ids(adapter, torch.tensor([ids]))
            assert torch.allclose(replay, searched, atol=1e-5)
            # the recorded fitness is the distance of the replayed conditioning to the target
            d = float(((replay[0].float() - target_of(adapter, prompts, i, 3.0)) ** 2).sum())
        assert d == pytest.approx(r.record["fitness_best"][i], rel=1e-4)
        assert r.record["fitness_best"][i] <= r.record["fitness_start_best"][i]
    (tmp_path / "run").mkdir()
    adv.save(tmp_path / "run")
    back = Adversarial.load(tmp_path / "run")
    assert back.token_ids == adv.token_ids
    edit.apply(pipe)
    try:
        for i in range(2):
            im = generate(pipe, back.prompts[i], n=1, seed=back.seeds[i], adversarial=tmp_path / "run", **SAMPLING)[0]
            assert np.array_equal(np.asarray(im), r.attacked_images[i])
    finally:
        edit.revert(pipe)


def test_fitness_falls_over_generations_on_the_world(world_pipe):
    """The genetic search on the world's trained text encoder: the best fitness never rises (the best
    individual survives), falls well below the start population's best, and beats a fresh random
    population of the same size."""
    adapter = get_adapter(world_pipe)
    prompts = ["a dotted cyan star on a white background", "red striped star, black background"]
    cfg = RingABellConfig(population=40, generations=40)
    v = vocabulary(adapter)
    for i in range(2):
        target = target_of(adapter, prompts, i, cfg.eta)
        ids, path = genetic_search(adapter, target, v, cfg, torch.Generator().manual_seed(i))
        assert len(path) == 40 and all(b <= a for a, b in itertools.pairwise(path)) and path[-1] < 0.9 * path[0]
        found = float(fitness(adapter, torch.tensor([ids]), target)[0])
        assert found == pytest.approx(path[-1], rel=1e-5)
        rand = v[torch.randint(0, len(v), (40, 16), generator=torch.Generator().manual_seed(100 + i))]
        assert found < float(fitness(adapter, rand, target).min())


def test_concept_pairs_replace_the_concept_word_and_its_synonyms(world_pipe):
    from erasekit.attacks.base import AttackContext, Item
    from erasekit.evaluation.prompts import world_prompt_sets

    spec = erasekit.ConceptSpec("star")
    sets = world_prompt_sets(spec, "shape", "star", 3)
    items = [Item(p, 0, name, None) for name in ("target", "generality") for p in sets[name].prompts]
    items.append(Item("a red shape", 0, "target", None))  # names the concept by no known word: no pair
    ctx = AttackContext(get_adapter(world_pipe), spec, "shape", "star", None, items, {})
    pairs = concept_pairs(ctx, "object")
    assert [p for p, _ in pairs] == list(dict.fromkeys(it.prompt for it in items[:-1]))
    for p, q in pairs:
        assert "object" in q.split() and not {"star", "pentagram", "asterisk"} & set(q.replace(",", " ").split())
    assert all("  " not in q and "object" not in q for _, q in concept_pairs(ctx, ""))
    c = concept_vector(ctx.adapter, pairs)
    assert c.shape == (20, 128) and float(c.norm()) > 0


def test_world_settings_are_valid():
    cfg = RingABellConfig(**RAB_WORLD)
    assert cfg.length + 2 <= 20 and RingABell.world_settings() == RAB_WORLD


def test_bad_settings_are_one_line(world_pipe, tmp_path):
    with pytest.raises(InvalidInputError, match="generations must be at least 1"):
        RingABell(generations=0)
    with pytest.raises(InvalidInputError, match="mutation"):
        RingABell(mutation=1.5)
    edit = uce_edit(world_pipe)
    with pytest.raises(InvalidInputError, match="reads 20") as e:
        attack(world_pipe, "star", RingABell(length=19, generations=1), patch=edit, seeds=range(1),
               sets=("target",), cache=tmp_path / "c")
    assert "\n" not in str(e.value)
