"""Adapters give what fine-tuning, guards and attacks need, and erasekit's one sampling loop gives
the pipeline's own images, bit for bit, and runs hooks where it says."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from erasekit.adapters import Encoded, get_adapter
from erasekit.adapters.sampling import Hook, SampleContext, StepContext
from erasekit.errors import InvalidInputError
from erasekit.generate import generate, to_uint8

from tiny import tiny_sd, tiny_sdxl

PROMPTS = ["a red star", "a striped blue heart against a sky backdrop"]
NEGATIVE = "a green circle"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok_sd"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("tok_sdxl"))


@pytest.fixture(params=["world", "sd", "sdxl"])
def any_pipe(request):
    return request.getfixturevalue({"world": "world_pipe"}.get(request.param, request.param))


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def pipeline_images(pipe: Any, steps: int, guidance: float, **kwargs: Any) -> np.ndarray:
    return pipe(PROMPTS, generator=gens(len(PROMPTS)), num_inference_steps=steps, guidance_scale=guidance,
                output_type="np", **kwargs).images


def hooked_forward_modules(pipe: Any) -> list[str]:
    """Modules with forward hooks (transformers adds its own to text-encoder layers that return hidden
    states: SDXL's; the SD pipeline's have none)."""
    return [f"{c}.{n}" for c, comp in pipe.components.items() if isinstance(comp, torch.nn.Module)
            for n, m in comp.named_modules() if m._forward_hooks]


class Negative(Hook):
    """Guide away from a prompt instead of the pipeline's unconditional conditioning."""

    def embeddings(self, ctx: SampleContext, cond: Encoded, uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        return cond, ctx.adapter.encode([NEGATIVE] * ctx.batch_size, unique=False)


def test_encode_embeddings_matches_encode_and_is_differentiable(any_pipe):
    a = get_adapter(any_pipe)
    tokens = [e.detach().requires_grad_() for e in a.token_embeddings(PROMPTS)]
    got, want = a.encode_embeddings(tokens, a.input_ids(PROMPTS)), a.encode(PROMPTS)
    assert (got.embeds - want.embeds).abs().max() < 1e-5
    assert torch.equal(got.lengths, want.lengths)
    assert (got.pooled is None) == (want.pooled is None)
    loss = got.embeds.square().sum()
    if got.pooled is not None:
        assert (got.pooled - want.pooled).abs().max() < 1e-5
        loss = loss + got.pooled.square().sum()
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tokens)
    assert not any(te.get_input_embeddings()._forward_hooks for te in a.text_encoders())
    with pytest.raises(InvalidInputError, match="one \\(N, L, d\\) tensor per text encoder"):
        a.encode_embeddings([t[:, :5] for t in tokens], a.input_ids(PROMPTS))


def test_sample_is_the_world_pipeline(world_pipe):
    """The shipped defaults (20 steps, guidance 2): the same images, bit for bit."""
    a = get_adapter(world_pipe)
    want = pipeline_images(world_pipe, 20, 2.0)
    assert np.array_equal(a.sample(PROMPTS, gens(2), 20, 2.0), want)
    assert a.prediction_type == "v_prediction" and a.image_size == want.shape[1:3]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sample_is_the_tiny_pipeline(family, request):
    pipe = request.getfixturevalue(family)
    a = get_adapter(pipe)
    want = pipeline_images(pipe, 3, 5.0)
    assert np.array_equal(a.sample(PROMPTS, gens(2), 3, 5.0), want)
    assert a.image_size == want.shape[1:3]


@pytest.mark.parametrize("family", ["world_pipe", "sdxl"])
def test_an_uncond_hook_is_the_pipelines_negative_prompt(family, request):
    """SDXL's negative-prompt path also brings pooled negatives (instead of its zeros)."""
    pipe = request.getfixturevalue(family)
    want = pipeline_images(pipe, 3, 5.0, negative_prompt=[NEGATIVE] * len(PROMPTS))
    assert np.array_equal(get_adapter(pipe).sample(PROMPTS, gens(2), 3, 5.0, hooks=[Negative()]), want)


def test_pass_through_noise_hook_and_encoded_input_change_nothing(sd):
    a = get_adapter(sd)

    class Same(Hook):
        def noise(self, ctx: StepContext, predict):
            return predict()

    want = a.sample(PROMPTS, gens(2), 2, 5.0)
    images, latents = a.sample(a.encode(PROMPTS, unique=False), gens(2), 2, 5.0, hooks=[Same()], output_type="pt",
                               return_latents=True)
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), want)
    assert latents.shape == (2, 4, 16, 16)


def test_module_hooks_change_images_and_are_removed_also_when_generation_raises(sd):
    a = get_adapter(sd)
    calls = []

    class Scale(Hook):
        def module_hooks(self, adapter):
            return {"unet.up_blocks.0.attentions.0.proj_out": lambda m, args, out: calls.append(1) or out * 3}

    class Boom(Scale):
        def noise(self, ctx: StepContext, predict):
            if ctx.index == 1:
                assert hooked_forward_modules(sd) == ["unet.up_blocks.0.attentions.0.proj_out"]
                raise RuntimeError("boom")
            return predict()

    plain = a.sample(PROMPTS, gens(2), 2, 5.0)
    assert not np.array_equal(a.sample(PROMPTS, gens(2), 2, 5.0, hooks=[Scale()]), plain) and calls
    assert hooked_forward_modules(sd) == []
    with pytest.raises(RuntimeError, match="boom"):
        a.sample(PROMPTS, gens(2), 2, 5.0, hooks=[Boom()])
    assert hooked_forward_modules(sd) == []
    assert np.array_equal(a.sample(PROMPTS, gens(2), 2, 5.0), plain)


def test_unknown_module_is_one_line_error(sd):
    class Bad(Hook):
        def module_hooks(self, adapter):
            return {"unet.no_such_block": lambda m, args, out: out}

    with pytest.raises(InvalidInputError, match="no module 'unet.no_such_block'"):
        get_adapter(sd).sample(PROMPTS, gens(2), 1, 5.0, hooks=[Bad()])
    assert hooked_forward_modules(sd) == []


def test_hook_edits_on_the_stack_run_first_and_noise_hooks_nest(sd, monkeypatch):
    order: list[str] = []

    class Tag(Hook):
        def __init__(self, name: str) -> None:
            self.name = name

        def embeddings(self, ctx, cond, uncond):
            order.append(f"embed {self.name}")
            return cond, uncond

        def noise(self, ctx, predict):
            order.append(f"enter {self.name}")
            return predict()

    class FakeEdit:
        kind = "hook"

        def hooks(self, adapter):
            return [Tag("edit")]

    monkeypatch.setattr(sd, "_erasekit_stack", [(FakeEdit(), lambda: None)], raising=False)
    get_adapter(sd).sample(PROMPTS[:1], gens(1), 1, 5.0, hooks=[Tag("arg")])
    assert order == ["embed edit", "embed arg", "enter arg", "enter edit"]  # later hooks wrap earlier ones


def test_generate_runs_applied_hook_edits(sd, monkeypatch):
    class Zero(Hook):
        def noise(self, ctx, predict):
            return predict() * 0

    class ZeroEdit:
        kind = "hook"

        def hooks(self, adapter):
            return [Zero()]

    plain = to_uint8(generate(sd, "a red star", n=2, seed=3, num_inference_steps=2, guidance_scale=5.0))
    want = sd(["a red star"] * 2, generator=gens(2, 3), num_inference_steps=2, guidance_scale=5.0).images
    assert np.array_equal(plain, to_uint8(want))
    monkeypatch.setattr(sd, "_erasekit_stack", [(ZeroEdit(), lambda: None)], raising=False)
    assert not np.array_equal(to_uint8(generate(sd, "a red star", n=2, seed=3, num_inference_steps=2,
                                                guidance_scale=5.0)), plain)


def test_training_helpers_round_trip(world_pipe):
    a = get_adapter(world_pipe)
    x0, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    assert torch.equal(a.add_noise(x0, noise, t), world_pipe.scheduler.add_noise(x0, noise, t))
    v = a.target(x0, noise, t)
    assert v.shape == x0.shape and not torch.equal(v, noise)  # v-prediction
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = a.encode_images(images)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.equal(a.encode_images(images, torch.Generator().manual_seed(0)),
                       a.encode_images(images, torch.Generator().manual_seed(0)))
    assert a.decode_latents(latents).shape == images.shape
    out = a.predict_noise(a.add_noise(latents, noise[:, :4], t), t, a.encode(PROMPTS), a.uncond(2), 2.0)
    assert out.shape == latents.shape


def test_modules_by_role_partition_the_unet_and_name_components(any_pipe):
    ad = get_adapter(any_pipe)
    k, v, kv = ad.modules("cross_attn_k"), ad.modules("cross_attn_v"), ad.modules("cross_attn_kv")
    assert k and v and set(kv) == set(k) | set(v) and not set(k) & set(v)
    cross, rest = ad.modules("cross_attn"), ad.modules("unet_no_cross_attn")
    assert set(kv) < set(cross) and not set(cross) & set(rest)
    assert all(n.startswith("unet.") for n in [*cross, *rest])
    assert all(n.split(".")[0] in ("text_encoder", "text_encoder_2") for n in ad.modules("text_encoder"))
    with pytest.raises(InvalidInputError, match="unknown module role 'attn'"):
        ad.modules("attn")
