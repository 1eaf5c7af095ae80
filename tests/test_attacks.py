"""The attack core: prompts with adversarial tokens encode as the tokenizer would, guarded predictions
run hook edits, artefacts replay bit for bit and refuse other models, run folders are atomic."""

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import Adversarial, attack, get_attack, guarded_prediction
from erasekit.attacks.artefact import encode_with_tokens, ids_to_vectors, token_sequences
from erasekit.attacks.report import write_attack_run
from erasekit.attacks.textual_inversion import TextualInversion
from erasekit.errors import InvalidInputError
from erasekit.generate import generate
from erasekit.methods import get_method
from tiny import tiny_sd, tiny_sdxl

PROMPTS = ["a red star on a white background", "a photo of a blue heart", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd": tiny_sd(tmp_path_factory.mktemp("tok")), "sdxl": tiny_sdxl(tmp_path_factory.mktemp("tok"))}


@pytest.fixture(scope="module")
def uce_star(world_pipe):
    return get_method("uce")().fit(get_adapter(world_pipe), [erasekit.ConceptSpec("star")])


@pytest.mark.parametrize("family", ["world", "sd", "sdxl"])
def test_prompts_without_tokens_encode_as_the_pipeline_does(family, tiny, world_pipe):
    pipe = world_pipe if family == "world" else tiny[family]
    adapter = get_adapter(pipe)
    for (ids, _), want in zip(token_sequences(adapter, PROMPTS, {}), adapter.input_ids(PROMPTS)):
        assert torch.equal(ids.cpu(), want.cpu())
    with torch.no_grad():
        got, ref = encode_with_tokens(adapter, PROMPTS, {}), adapter.encode(PROMPTS, unique=False)
    assert torch.allclose(got.embeds, ref.embeds, atol=1e-5)
    assert torch.equal(got.lengths, ref.lengths)
    if ref.pooled is not None:
        assert torch.allclose(got.pooled, ref.pooled, atol=1e-5)


@pytest.mark.parametrize("family", ["world", "sdxl"])
def test_a_token_of_vocabulary_rows_encodes_as_those_words(family, tiny, world_pipe):
    pipe = world_pipe if family == "world" else tiny[family]
    adapter = get_adapter(pipe)
    ids = adapter.input_ids(["red star"])[0][0, 1:3].tolist()
    tokens = {"<adv-0>": ids_to_vectors(adapter, ids)}
    with torch.no_grad():
        got = encode_with_tokens(adapter, ["a <adv-0> on a white background"], tokens)
        ref = adapter.encode(["a red star on a white background"], unique=False)
    assert torch.allclose(got.embeds, ref.embeds, atol=1e-5)
    assert torch.equal(got.lengths, ref.lengths)


def test_a_prompt_with_too_many_vectors_for_the_context_is_one_line(world_pipe):
    adapter = get_adapter(world_pipe)
    d = adapter.text_encoders()[0].get_input_embeddings().weight.shape[1]
    with pytest.raises(InvalidInputError, match="shorten the prompt"):
        encode_with_tokens(adapter, ["a photo of a red <adv> on a white background"], {"<adv>": [torch.zeros(16, d)]})


def test_guarded_prediction_is_the_plain_prediction_without_hooks_and_the_guided_step_with_them(world_pipe):
    adapter = get_adapter(world_pipe)
    cond = adapter.encode(["a red star"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        plain = guarded_prediction(adapter, x, t, cond, 20, 2.0)
        assert torch.equal(plain, adapter.predict_noise(x, t, cond))
        neg = get_method("negative-prompt")().fit(adapter, [erasekit.ConceptSpec("star")])
        neg.apply(world_pipe)
        try:
            guarded = guarded_prediction(adapter, x, t, cond, 20, 2.0)
        finally:
            neg.revert(world_pipe)
        want = adapter.predict_noise(x, t, cond, adapter.encode([neg.manifest["hook"]["negative_prompt"]]), 2.0)
    assert torch.allclose(guarded, want, atol=1e-6)
    assert not torch.allclose(guarded, plain, atol=1e-3)


def test_textual_inversion_replays_bit_for_bit_and_the_pipeline_is_left_as_it_was(world_pipe, uce_star, tmp_path):
    before = {k: v.clone() for k, v in world_pipe.unet.state_dict().items()}
    atk = TextualInversion(steps=3, batch_size=2, init_word="shape")
    r = attack(world_pipe, "star", atk, patch=uce_star, seeds=[0, 5], sets=("target", "generality"),
               cache=tmp_path / "c")
    assert all(torch.equal(v, world_pipe.unet.state_dict()[k]) for k, v in before.items())
    assert len(r.items) == 4 and len(r.adversarial.prompts) == 4
    assert all("<adv>" in p for p in r.adversarial.prompts)
    assert r.cost["unet_calls"] == 3 and r.record["objective_first"] > 0
    write_attack_run(r, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "attack.json").read_text())
    assert saved["success"]["all"]["n"] == 4 and saved["items"][1]["seed"] == 5
    adv = Adversarial.load(tmp_path / "run")
    assert torch.equal(adv.tokens["<adv>"][0], r.adversarial.tokens["<adv>"][0])
    uce_star.apply(world_pipe)
    try:
        for i in (0, 3):
            im = generate(world_pipe, adv.prompts[i], n=1, seed=adv.seeds[i], adversarial=tmp_path / "run")[0]
            assert np.array_equal(np.asarray(im), r.attacked_images[i])
    finally:
        uce_star.revert(world_pipe)


def test_an_attack_is_seeded(world_pipe, uce_star, tmp_path):
    runs = [attack(world_pipe, "star", TextualInversion(steps=2, batch_size=2), patch=uce_star, seeds=[0],
                   sets=("target",), cache=tmp_path / "c", seed=s) for s in (7, 7, 8)]
    a, b, c = (r.adversarial.tokens["<adv>"][0] for r in runs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_an_artefact_refuses_another_model(world_pipe, tiny, tmp_path):
    adapter = get_adapter(world_pipe)
    d = adapter.text_encoders()[0].get_input_embeddings().weight.shape[1]
    adv = Adversarial("textual-inversion", {"<adv>": [torch.zeros(1, d)]}, prompts=["a <adv>"], seeds=[0],
                      manifest={"family": "sd", "model_fingerprint": adapter.fingerprint()})
    adv.check(adapter)
    with pytest.raises(InvalidInputError, match="another model"):
        adv.check(get_adapter(tiny["sd"]))
    with pytest.raises(InvalidInputError, match="sd model, not sdxl"):
        adv.check(get_adapter(tiny["sdxl"]))
    with pytest.raises(InvalidInputError, match="another architecture"):
        adv.check(get_adapter(tiny["sd"]), force=True)
    with pytest.raises(InvalidInputError, match="names none of the artefact's tokens"):
        generate(world_pipe, "a red star", n=1, adversarial=adv)


def test_an_interrupted_attack_leaves_no_run_folder(world_pipe, uce_star, tmp_path, monkeypatch):
    from erasekit.cli import run

    def boom(self, ctx):
        raise KeyboardInterrupt

    uce_star.save(tmp_path / "edit")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(TextualInversion, "run", boom)
    assert run(["attack", "-c", "star", "-a", "textual-inversion", "-p", "edit", "--seeds", "0", "--sets", "target",
                "-o", "r"]) == 130
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]
    assert world_pipe.unet.state_dict().keys()  # the pipeline is still whole
    from erasekit.edits import applied

    assert not applied(world_pipe)


def test_unknown_attack_and_sets_are_one_line(world_pipe):
    with pytest.raises(InvalidInputError, match="unknown attack"):
        get_attack("nope")
    with pytest.raises(InvalidInputError, match="unknown prompt set 'neighbours'"):
        attack(world_pipe, "star", "textual-inversion", seeds=[0], sets=("neighbours",))
    with pytest.raises(InvalidInputError, match="steps must be at least 1"):
        TextualInversion(steps=0)


def test_concept_arithmetic_composes_over_a_guard_that_asks_for_other_conditioning(world_pipe):
    """An outer hook that asks for other conditioning (concept arithmetic's terms) reaches an inner hook
    that asks for its own (SAFREE's projected conditioning) by the keywords every hook uses."""
    from erasekit.attacks.artefact import ArithmeticHook

    adapter = get_adapter(world_pipe)
    safree = get_method("safree")().fit(adapter, [erasekit.ConceptSpec("star")])
    with safree.scoped(world_pipe), torch.no_grad():
        cond = encode_with_tokens(adapter, ["a red star"], {})
        plain = adapter.sample(cond, [torch.Generator().manual_seed(0)], 3, 2.0)
        same = adapter.sample(cond, [torch.Generator().manual_seed(0)], 3, 2.0, hooks=[ArithmeticHook([("{prompt}", 1.0)])])
        more = adapter.sample(cond, [torch.Generator().manual_seed(0)], 3, 2.0,
                              hooks=[ArithmeticHook([("{prompt}", 1.0), ("a photo of a pentagram", 2.0)])])
    assert np.allclose(plain, same, atol=1e-5)
    assert not np.allclose(plain, more, atol=1e-3)


def test_concept_steerers_steers_embeddings_that_carry_their_tokens_as_it_steers_prompts(tiny):
    pipe = tiny["sd"]
    adapter = get_adapter(pipe)
    edit = erasekit.erase(pipe, "star", method="concept-steerers", sae_latents=64, sae_k=4, sae_steps=30)
    prompt = ["a photo of a star"]
    with edit.scoped(pipe), torch.no_grad():
        a = adapter.sample(prompt, [torch.Generator().manual_seed(0)], 2, 5.0)
        b = adapter.sample(encode_with_tokens(adapter, prompt, {}), [torch.Generator().manual_seed(0)], 2, 5.0)
    with torch.no_grad():
        plain = adapter.sample(prompt, [torch.Generator().manual_seed(0)], 2, 5.0)
    assert np.allclose(a, b, atol=1e-4)
    assert not np.allclose(a, plain, atol=1e-4)
