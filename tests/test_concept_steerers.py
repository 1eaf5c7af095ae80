"""Concept Steerers: the steering direction (dense code, decoder without bias), the sign rule (the prompt
loses it, the unconditional prompt gains it) whatever order the text encoder is called in, composition
with other guards, SDXL, and one-line errors."""

import numpy as np
import pytest
import torch
from tiny import tiny_sd, tiny_sdxl

import erasekit
from erasekit.adapters import Encoded, get_adapter
from erasekit.adapters.sampling import Hook, SampleContext
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from erasekit.methods.concept_steerers import (
    ConceptSteerers,
    default_site,
    steered,
    steering_direction,
)
from erasekit.sae import TopKSAE

TINY = {"sae_latents": 64, "sae_k": 4, "sae_steps": 30}
SPEC = erasekit.ConceptSpec("star", preserve=("circle", "heart"))
PROMPTS = ["a photo of a star", "a red circle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def edit(pipe):
    return erasekit.erase(pipe, SPEC, method="concept-steerers", **TINY)


def gens(n=1):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def conditioning(pipe, hooks, prompts=PROMPTS):
    """(cond, uncond) after the hooks' ``embeddings``, as the sampling loop computes them."""
    ad = get_adapter(pipe)
    cond, uncond = ad.encode(prompts, unique=False), ad.uncond(len(prompts))
    ctx = SampleContext(ad, list(prompts), 2, 5.0, len(prompts))
    for h in hooks:
        cond, uncond = h.embeddings(ctx, cond, uncond)
    return cond, uncond


def test_direction_is_the_dense_code_decoded_without_bias():
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(8, 24, 2)
    sae.init_from(torch.randn(100, 8, generator=g) + 2, generator=g)
    h = torch.randn(5, 8, generator=g) + 2
    pre = torch.relu((h * sae.scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert ((pre > 0).sum(-1) > 2).all()  # dense: more than k latents take part
    assert torch.allclose(steering_direction(sae, h), pre @ sae.W_dec / sae.scale, atol=1e-6)
    assert not torch.allclose(steering_direction(sae, h), sae.decode(pre), atol=1e-3)  # no decoder bias


def test_prompt_loses_the_vector_and_the_unconditional_prompt_gains_it(pipe, edit):
    ad = get_adapter(pipe)
    site, vec = edit.manifest["hook"]["site"], edit.tensors()["direction"]
    assert site == ad.site(default_site(ad)) == "text_encoder.encoder.layers.3"  # 3/4 of 5 layers, not the last
    assert vec.shape == (pipe.tokenizer.model_max_length, 32) and edit.manifest["direction_norm"] > 0
    cond, uncond = conditioning(pipe, ConceptSteerers.make_hooks(edit, ad))
    with steered(ad, site, -vec):
        want_c = ad.encode(PROMPTS, unique=False)
    with steered(ad, site, vec):
        want_u = ad.encode(["", ""], unique=False)
    assert torch.equal(cond.embeds, want_c.embeds) and torch.equal(uncond.embeds, want_u.embeds)
    plain = ad.encode(PROMPTS, unique=False)
    assert not torch.allclose(cond.embeds, plain.embeds, atol=1e-4)


class EncodesFirst(Hook):
    """Calls the text encoder on other text before the steering hook runs (the official counter would then
    give the prompt the wrong sign)."""

    def embeddings(self, ctx, cond, uncond):
        ctx.adapter.encode(["", "a moon", ""], unique=False)
        return cond, uncond


def test_independent_of_the_order_text_is_encoded(pipe, edit):
    ad = get_adapter(pipe)
    ref = conditioning(pipe, ConceptSteerers.make_hooks(edit, ad))
    got = conditioning(pipe, [EncodesFirst(), *ConceptSteerers.make_hooks(edit, ad)])
    assert torch.equal(ref[0].embeds, got[0].embeds) and torch.equal(ref[1].embeds, got[1].embeds)


def test_over_another_guard_the_steering_difference_is_added(pipe, edit):
    ad = get_adapter(pipe)
    neg = erasekit.erase(pipe, "moon", method="negative-prompt")
    site, vec = edit.manifest["hook"]["site"], edit.tensors()["direction"]
    _, uncond = conditioning(pipe, [*neg.hooks(ad), *ConceptSteerers.make_hooks(edit, ad)])
    with steered(ad, site, vec):
        plus = ad.encode(["", ""], unique=False)
    want = ad.encode(["moon", "moon"], unique=False).embeds + (plus.embeds - ad.encode(["", ""], unique=False).embeds)
    assert torch.allclose(uncond.embeds, want, atol=1e-5)


def test_apply_changes_images_revert_restores_them_and_strength_zero_is_identity(pipe, edit):
    ad = get_adapter(pipe)
    base = ad.sample(["a photo of a star"], gens(), 2, 5.0)
    with edit.scoped(pipe):
        changed = ad.sample(["a photo of a star"], gens(), 2, 5.0)
    assert np.abs(changed - base).max() > 1e-4 and np.array_equal(ad.sample(["a photo of a star"], gens(), 2, 5.0), base)
    off = erasekit.erase(pipe, SPEC, method="concept-steerers", **TINY, strength=0.0)
    assert torch.equal(off.tensors()["direction"], edit.tensors()["direction"])  # strength acts at generation
    with off.scoped(pipe):
        assert np.array_equal(ad.sample(["a photo of a star"], gens(), 2, 5.0), base)


def test_sdxl_zero_unconditional_branch_is_left_alone(tmp_path):
    pipe = tiny_sdxl(tmp_path)
    ad = get_adapter(pipe)
    edit = erasekit.erase(pipe, SPEC, method="concept-steerers", **TINY)
    cond, uncond = conditioning(pipe, ConceptSteerers.make_hooks(edit, ad))
    assert pipe.config.force_zeros_for_empty_prompt and not uncond.embeds.any()  # the text encoder never made it
    plain = ad.encode(PROMPTS, unique=False)
    assert not torch.allclose(cond.embeds, plain.embeds, atol=1e-4)  # the penultimate layer SDXL reads is steered
    base = ad.sample(["a star"], gens(), 2, 5.0)
    with edit.scoped(pipe):
        assert np.abs(ad.sample(["a star"], gens(), 2, 5.0) - base).max() > 1e-4


def test_a_given_sae_brings_its_site_and_is_checked(pipe, edit, tmp_path):
    h = edit.manifest["hook"]
    sae = TopKSAE(32, 64, 4, {**h["sae_config"]["meta"], "site": "text_encoder.encoder.layers.1"})
    sae.init_from(torch.randn(50, 32), generator=torch.Generator().manual_seed(0))
    sae.save(tmp_path / "ok")
    e = erasekit.erase(pipe, SPEC, method="concept-steerers", sae=str(tmp_path / "ok"))
    assert e.manifest["hook"]["site"] == "text_encoder.encoder.layers.1" and e.manifest["hook"]["sae_digest"] == sae.digest()

    def err(sae_dir, match):
        with pytest.raises(InvalidInputError, match=match) as ex:
            erasekit.erase(pipe, SPEC, method="concept-steerers", sae=str(sae_dir))
        assert "\n" not in str(ex.value)

    TopKSAE(32, 64, 4, {**sae.meta, "model_fingerprint": "0" * 16}).save(tmp_path / "other")
    err(tmp_path / "other", "another model")
    TopKSAE(64, 64, 4, {**sae.meta, "site": "unet.up_blocks.0.attentions.1"}).save(tmp_path / "unet")
    err(tmp_path / "unet", "not in a text encoder")
    TopKSAE(16, 64, 4, dict(sae.meta)).save(tmp_path / "narrow")
    err(tmp_path / "narrow", "16-channel.*gives 32")


@pytest.mark.parametrize("settings, match", [
    ({"strength": -1.0}, "strength=-1.0 must be positive.*official --strength -1 is strength=1"),
    ({"site": "unet-up-attn-0-1"}, "not in a text encoder"),
    ({"site": "text-encoder-layer-9"}, "unknown site 'text-encoder-layer-9'"),
    ({"template": "no slot"}, "template.*has no"),
    ({"sae_k": 65, "sae_latents": 64}, "sae_k=65"),
])
def test_bad_settings_are_one_line_errors(pipe, settings, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        erasekit.erase(pipe, SPEC, method="concept-steerers", **{**TINY, **settings})
    assert "\n" not in str(err.value)


def test_prompt_embeddings_are_refused(pipe, edit):
    ad = get_adapter(pipe)
    enc = ad.encode(["a star"])
    with edit.scoped(pipe), pytest.raises(InvalidInputError, match="generate from prompts"):
        ad.sample(Encoded(enc.embeds, enc.lengths), gens(), 2, 5.0)


def test_registered_as_an_sae_method():
    m = get_method("concept-steerers")
    assert m is ConceptSteerers and m.edit_kind == "hook" and m.family == "sae"


@pytest.mark.slow  # 32 s on 2 cores (an SAE trained on the world first): kept out of the default 10 minutes
def test_lowers_star_detection_on_the_world(world_pipe, classifier):
    """On the trained world model its world settings take stars away (at a cost to the other shapes that
    STEERERS_WORLD's comment and the README's table report; not asserted here). The SAE trains 600 steps
    instead of 3000 to keep this quick; its steering vector is larger, so this erases more."""
    from test_world_erasure import prompts_for, rate

    from erasekit.methods.concept_steerers import STEERERS_WORLD
    from erasekit.world.vocab import SHAPES

    others = tuple(s for s in SHAPES if s != "star")
    edit = erasekit.erase(world_pipe, erasekit.ConceptSpec("star", preserve=others), method="concept-steerers",
                          sae_steps=600, **STEERERS_WORLD)
    stars = prompts_for("shape", "star", 16, seed=1)
    t0 = rate(world_pipe, classifier, stars, "shape", "star", 1000)
    with edit.scoped(world_pipe):
        t1 = rate(world_pipe, classifier, stars, "shape", "star", 1000)
    assert t0 - t1 >= 0.5, (t0, t1)
