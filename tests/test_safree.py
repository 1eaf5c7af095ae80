"""SAFREE: projection of trigger rows only, trigger detection on the world, the SVF step rule, LRA's
module hooks, and one-line errors for bad settings."""

import math

import numpy as np
import pytest
import torch
from tiny import tiny_sd

import erasekit
from erasekit.adapters import Encoded, get_adapter
from erasekit.adapters.sampling import SampleContext
from erasekit.errors import InvalidInputError
from erasekit.methods.safree import (
    SafreeConfig,
    lra_skip_map,
    projector,
    safree_rows,
    svf_steps,
    triggers,
)


def test_projection_leaves_other_rows_exact_and_removes_the_toxic_part_of_trigger_rows():
    g = torch.Generator().manual_seed(0)
    d, n, length = 16, 6, 8  # start token, 6 real tokens, end token, then padding
    x = torch.randn(12, d, generator=g)
    masked = torch.randn(n, d, generator=g)
    p_c = projector(torch.randn(2, d, generator=g))
    res = safree_rows(x, length, masked, p_c, SafreeConfig(alpha=0.0))
    rows = torch.zeros(len(x), dtype=torch.bool)
    rows[1:n + 1] = res.trigger
    assert res.trigger.any() and not res.trigger.all()
    assert torch.equal(res.rows[~rows], x[~rows])  # start, end, padding and non-trigger tokens: bit for bit
    new = res.rows[rows].double()
    assert not torch.allclose(new, x[rows].double())
    assert (new @ p_c).norm() < 1e-5 * new.norm()  # no component left in the toxic subspace
    want = x[rows].double() @ projector(masked) @ (torch.eye(d, dtype=torch.float64) - p_c)  # (I - P_C) P_M x
    assert torch.allclose(new, want, atol=1e-6)


def test_trigger_rule_is_the_leave_one_out_mean_with_alpha():
    p_c = torch.zeros(3, 3, dtype=torch.float64)  # empty toxic subspace: the distance is the norm
    masked = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]])
    # leave-one-out means 2.5, 2, 1.5: token i is a trigger unless d_i < (1 + alpha) * mean (ties count)
    assert triggers(masked, p_c, 0.0).tolist() == [False, True, True]
    assert triggers(masked, p_c, 0.01).tolist() == [False, False, True]
    assert triggers(masked, p_c, 1.0).tolist() == [False, False, True]
    assert triggers(masked, p_c, 1.01).tolist() == [False, False, False]
    assert triggers(masked[:1], p_c, 0.01).tolist() == [True]  # one token: NaN mean, official marks it


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.5333, 0.6, 0.9])
def test_svf_steps_follow_the_official_formula(beta):
    want = round(10 / (1 + math.exp(-2 * 2.5 * (10 * beta - 5.333))))
    assert svf_steps(beta, 10, 2.5, 5.333) == want
    assert svf_steps(beta, 4, 3.5, 5.5) == round(4 / (1 + math.exp(-2 * 3.5 * (10 * beta - 5.5))))


def _hook(pipe, prompts, **cfg):
    edit = erasekit.erase(pipe, "star", method="safree", **cfg)
    ad = get_adapter(pipe)
    hook = edit.hooks(ad)[0]
    cond = ad.encode(prompts)
    hook.embeddings(SampleContext(ad, prompts, 20, 2.0, len(prompts)), cond, ad.uncond(len(prompts)))
    return hook, cond


def test_world_trigger_detection_and_svf(world_pipe):
    prompts = ["a photo of a star", "a photo of a circle"]
    hook, cond = _hook(world_pipe, prompts)
    star, circle = hook.info
    # real tokens: a photo of a star|circle. The concept token is a trigger in the star prompt and not in
    # the circle prompt. "photo" (and, on the broad-grammar model, "of") is flagged in both: the world's
    # 128-d encoder puts every pooled embedding near one direction (cos ~0.99 with "star" on the first
    # world model), so removing any content word moves the prompt away from the rank-1 toxic subspace by
    # about as much (ratios 1.09-1.13 vs 1.12 for "star" there); no alpha separates "star" from "photo".
    assert star.trigger[4] and not circle.trigger[4]
    assert star.trigger.tolist() == [False, True, True, False, True]
    assert circle.trigger.tolist() == [False, True, True, False, False]
    # the hook's projected conditioning: only trigger rows (token index + 1) differ
    for i, r in enumerate(hook.info):
        rows = torch.zeros(cond.embeds.shape[1], dtype=torch.bool)
        rows[1:6] = r.trigger
        assert torch.equal(hook.projected.embeds[i][~rows], cond.embeds[i][~rows])
        assert (hook.projected.embeds[i][rows] - cond.embeds[i][rows]).abs().amax(-1).min() > 1e-3
        assert r.steps == svf_steps(r.beta, 10, 2.5, 5.333)
    # steps with index <= t' use the projection, later ones the original conditioning (None)
    t = int(hook.steps.max())
    assert torch.equal(hook.guarded(t).embeds[hook.steps >= t], hook.projected.embeds[hook.steps >= t])
    assert hook.guarded(t + 1) is None


def test_lra_maps_the_skips_of_the_first_two_decoder_stages_and_changes_images(tmp_path):
    pipe = tiny_sd(tmp_path)
    # tiny UNet: conv_in, down 0 (2 resnets + downsampler), down 1 (2 resnets); up 0 reads the last 3, up 1 the rest
    assert lra_skip_map(pipe.unet, 0.9, 0.2) == {1: {0: 0.9, 1: 0.9}, 0: {2: 0.9, 0: 0.2, 1: 0.2}}
    ad = get_adapter(pipe)
    gens = lambda: [torch.Generator().manual_seed(0)]
    plain = erasekit.erase(pipe, "star", method="safree", negative_prompt=False)
    lra = erasekit.erase(pipe, "star", method="safree", negative_prompt=False, lra=True)
    before = {n: len(m._forward_hooks) for n, m in pipe.unet.named_modules()}
    with plain.scoped(pipe):
        a = ad.sample(["a photo of a star"], gens(), 2, 5.0)
    with lra.scoped(pipe):
        b = ad.sample(["a photo of a star"], gens(), 2, 5.0)
    assert np.abs(a - b).max() > 1e-4
    assert {n: len(m._forward_hooks) for n, m in pipe.unet.named_modules()} == before


@pytest.mark.parametrize("setting, match", [
    ({"alpha": -0.1}, "alpha=-0.1 is out of range: it must be at least 0"),
    ({"up_t": -1}, "up_t=-1 is out of range"),
    ({"svf_k": 0.0}, "svf_k=0.0 is out of range: it must be above 0"),
    ({"lra_s1": -1.0}, "lra_s1=-1.0 is out of range"),
    ({"gamma": 1.0}, "safree has no setting"),
])
def test_bad_settings_are_one_line_errors(tmp_path, setting, match):
    with pytest.raises(InvalidInputError, match=match) as e:
        erasekit.erase(tiny_sd(tmp_path), "star", method="safree", **setting)
    assert "\n" not in str(e.value)


def test_embeddings_without_prompt_text_are_refused(tmp_path):
    pipe = tiny_sd(tmp_path)
    ad = get_adapter(pipe)
    edit = erasekit.erase(pipe, "star", method="safree")
    enc = ad.encode(["a photo of a star"])
    with edit.scoped(pipe), pytest.raises(InvalidInputError, match="from the prompt's tokens"):
        ad.sample(Encoded(enc.embeds, enc.lengths), [torch.Generator().manual_seed(0)], 2, 5.0)


def test_embeddings_that_carry_their_tokens_are_guarded_as_their_prompt_is(tmp_path):
    """An attack's conditioning (encode_embeddings) carries what the text encoder read, so SAFREE finds
    trigger tokens in it as it does in the prompt's text, and guards it the same."""
    pipe = tiny_sd(tmp_path)
    ad = get_adapter(pipe)
    edit = erasekit.erase(pipe, "star", method="safree")
    prompt = ["a photo of a star"]
    enc = ad.encode_embeddings(ad.token_embeddings(prompt), ad.input_ids(prompt))
    with edit.scoped(pipe), torch.no_grad():
        a = ad.sample(prompt, [torch.Generator().manual_seed(0)], 2, 5.0)
        b = ad.sample(enc, [torch.Generator().manual_seed(0)], 2, 5.0)
    assert np.allclose(a, b, atol=1e-4)


def test_svf_steps_through_the_noise_hook_match_projecting_through_embeddings(tmp_path):
    """With t' >= the last step index, SVF projects every step through its own UNet call; that must give
    what the loop gives with the projected conditioning put in through ``embeddings`` (svf off)."""
    pipe = tiny_sd(tmp_path)
    ad = get_adapter(pipe)
    out = []
    for svf in (True, False):
        edit = erasekit.erase(pipe, "star", method="safree", svf=svf, negative_prompt=False)
        with edit.scoped(pipe):
            out.append(ad.sample(["a photo of a star"], [torch.Generator().manual_seed(0)], 2, 5.0))
    assert _hook(pipe, ["a photo of a star"], negative_prompt=False)[0].info[0].steps >= 1  # t' covers step 1
    assert np.array_equal(out[0], out[1])


def test_inner_noise_hooks_run_on_the_projected_steps_with_the_projected_conditioning(tmp_path):
    """SAFREE asks the inner prediction for its projected conditioning (``predict(cond=...)``): a hook
    stacked inside it (SLD, say) runs on every step and sees that conditioning."""
    from erasekit.adapters.sampling import Hook

    pipe = tiny_sd(tmp_path)
    ad = get_adapter(pipe)
    seen = []

    class Record(Hook):
        def noise(self, ctx, predict):
            seen.append((ctx.index, ctx.cond.embeds.clone()))
            return predict()

    edit = erasekit.erase(pipe, "star", method="safree", negative_prompt=False)
    original = ad.encode(["a photo of a star"]).embeds
    ad.sample(["a photo of a star"], [torch.Generator().manual_seed(0)], 2, 5.0,
              hooks=[Record(), *edit.hooks(ad)])
    assert [i for i, _ in seen] == [0, 1]
    assert not torch.equal(seen[0][1], original)  # step 0 is an SVF step: the projected rows
