"""Safe Latent Diffusion: warm-up by step index, one 3x-batch UNet call per step, presets,
momentum per sampling call, the epsilon-space rule for v-prediction, and one-line errors."""

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.adapters.sampling import Hook
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from erasekit.methods.sld import PRESETS, SLD, SLDConfig, SLDHook, sld_term
from tiny import tiny_sd, tiny_sdxl

STEPS, W = 4, 5.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only spins, and on a busy 2-core machine that made these
    tests ~100x slower (8 s instead of 0.07 s per 4-step sample)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"))


def gens(n=1):
    return [torch.Generator().manual_seed(i) for i in range(n)]


class Record(Hook):
    """Outermost hook: records each step's index, timestep and final guided prediction."""

    def __init__(self):
        self.steps = []

    def noise(self, ctx, predict):
        out = predict()
        self.steps.append((ctx.index, int(ctx.t), out.detach().clone()))
        return out


def run(pipe, hooks=(), prompts=("a photo of a star",), steps=STEPS, guidance=W):
    rec = Record()
    img = get_adapter(pipe).sample(list(prompts), gens(len(prompts)), steps, guidance, hooks=[*hooks, rec])
    return img, rec.steps


def sld_hook(pipe, **settings):
    edit = erasekit.erase(pipe, "star", method="sld", **settings)
    return edit, SLD.make_hooks(edit, get_adapter(pipe))[0]


def test_presets_resolve_as_published():
    table = {  # delta, s_S, lambda, s_m, beta_m (SLD paper's configurations; diffusers' SafetyConfig)
        "weak": (15, 20, 0.0, 0.0, 0.0), "medium": (10, 1000, 0.01, 0.3, 0.4),
        "strong": (7, 2000, 0.025, 0.5, 0.7), "max": (0, 5000, 1.0, 0.5, 0.7)}
    keys = ("warmup", "sld_guidance", "threshold", "momentum_scale", "momentum_beta")
    assert set(PRESETS) == set(table)
    for name, vals in table.items():
        assert SLDConfig(preset=name).resolved() == dict(zip(keys, vals))
    assert SLDConfig().preset == "medium"  # the official pipeline's default
    r = SLDConfig(preset="strong", warmup=0, threshold=-0.5).resolved()  # a setting overrides its preset
    assert r == {**dict(zip(keys, table["strong"])), "warmup": 0, "threshold": -0.5}


def test_edit_records_resolved_knobs_and_safety_concept(pipe):
    edit = erasekit.erase(pipe, [erasekit.ConceptSpec("star", synonyms=("pentagram",)), "moon"], method="sld",
                          preset="max", momentum_beta=0.2)
    assert edit.kind == "hook"
    assert edit.manifest["safety_concept"] == "star, pentagram, moon"
    assert edit.manifest["sld"] == {**PRESETS["max"], "momentum_beta": 0.2}
    assert erasekit.erase(pipe, "star", method="sld", template="an image showing {}").manifest["safety_concept"] \
        == "an image showing star"
    assert erasekit.erase(pipe, "star", method="sld", safety_prompt="hate,  violence").manifest["safety_concept"] \
        == "hate, violence"


@pytest.mark.parametrize("settings, match", [
    ({"preset": "extreme"}, "preset.*one of weak, medium, strong, max"),
    ({"sld_guidance": -1.0}, "sld_guidance.*at least 0"),
    ({"warmup": -1}, "warmup.*at least 0"),
    ({"momentum_scale": -0.1}, "momentum_scale.*at least 0"),
    ({"momentum_beta": 1.5}, "momentum_beta.*at most 1"),
    ({"space": "x0"}, "space.*one of epsilon, model"),
    ({"template": "no slot"}, "template.*has no"),
    ({"speed": 2}, "no setting"),
])
def test_bad_settings_are_one_line_errors(pipe, settings, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        erasekit.erase(pipe, "star", method="sld", **settings)
    assert "\n" not in str(err.value)


def test_warmup_counts_sampling_steps_not_timesteps(pipe):
    warmup = 2
    _, plain = run(pipe)
    _, hook = sld_hook(pipe, preset="max", warmup=warmup)
    _, guarded = run(pipe, [hook])
    timesteps = [t for _, t, _ in plain]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] > 500  # they run down towards 0
    changed = [i for (i, _, a), (_, _, b) in zip(plain, guarded) if (a - b).abs().max() > 1e-4]
    same = [i for (i, _, a), (_, _, b) in zip(plain, guarded) if torch.allclose(a, b, atol=1e-5)]
    assert changed == [i for i in range(STEPS) if i >= warmup] and same == list(range(warmup))
    # a warm-up tested on timestep values (t >= warmup) would guide every step but the last one
    assert changed != [i for i, t in enumerate(timesteps) if t >= warmup]
    assert hook.momentum is not None and hook.momentum.abs().max() > 0  # momentum built up, warm-up included


def test_momentum_builds_during_warmup(pipe):
    """Nothing is applied before the warm-up ends, yet the momentum gathered then acts at the first guided step."""
    _, hook = sld_hook(pipe, preset="max", warmup=STEPS - 1, momentum_scale=0.5, momentum_beta=0.9)
    _, with_mom = run(pipe, [hook])
    _, hook0 = sld_hook(pipe, preset="max", warmup=STEPS - 1, momentum_scale=0.0)
    _, without = run(pipe, [hook0])
    last = STEPS - 1
    assert not torch.allclose(with_mom[last][2], without[last][2], atol=1e-5)


def test_one_unet_call_per_step_on_a_3x_batch(pipe):
    edit = erasekit.erase(pipe, "star", method="sld", preset="max")
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        get_adapter(pipe).sample(["a star", "a moon"], gens(2), STEPS, W)
        plain = list(batches)
        batches.clear()
        with edit.scoped(pipe):
            get_adapter(pipe).sample(["a star", "a moon"], gens(2), STEPS, W)
    finally:
        handle.remove()
    assert plain == [4] * STEPS and batches == [6] * STEPS


def test_momentum_is_fresh_for_every_sampling_call(pipe):
    edit = erasekit.erase(pipe, "star", method="sld", preset="strong", warmup=1)
    ad = get_adapter(pipe)
    assert SLD.make_hooks(edit, ad)[0] is not SLD.make_hooks(edit, ad)[0]
    base = ad.sample(["a photo of a star"], gens(), STEPS, W)
    with edit.scoped(pipe):
        first = ad.sample(["a photo of a star"], gens(), STEPS, W)
        second = ad.sample(["a photo of a star"], gens(), STEPS, W)
    assert np.abs(first - base).max() > 1e-4
    assert np.array_equal(first, second)  # a momentum carried over would change the second call


def test_without_guidance_sld_does_nothing(pipe):
    edit = erasekit.erase(pipe, "star", method="sld", preset="max")
    base = get_adapter(pipe).sample(["a star"], gens(), 2, 1.0)
    with edit.scoped(pipe):
        assert np.array_equal(get_adapter(pipe).sample(["a star"], gens(), 2, 1.0), base)


def test_an_inner_noise_hook_is_kept(pipe):
    """A noise hook inside SLD keeps its prediction; SLD subtracts its term from it (identity here)."""

    class Inner(Hook):
        def noise(self, ctx, predict):
            return predict() * 1.0

    _, hook = sld_hook(pipe, preset="max")
    _, direct = run(pipe, [hook])
    _, hook2 = sld_hook(pipe, preset="max")
    _, wrapped = run(pipe, [Inner(), hook2])
    assert all(torch.allclose(a, b, atol=1e-5) for (_, _, a), (_, _, b) in zip(direct, wrapped))


def _reference(e_u, e_p, e_s, nu, p):
    """METHODS.md §3.2 written out on noise predictions (independently of sld_term)."""
    d = e_p - e_s
    mu = torch.where(d < p["threshold"], torch.minimum(torch.ones_like(d), p["sld_guidance"] * d.abs()), 0 * d)
    gamma = mu * (e_s - e_u) + p["momentum_scale"] * nu
    return gamma, p["momentum_beta"] * nu + (1 - p["momentum_beta"]) * gamma


def test_rule_in_epsilon_space_for_v_prediction():
    """For a v-model, space=epsilon is SLD on the equivalent epsilon-model: eps = sigma x + alpha v."""
    g = torch.Generator().manual_seed(0)
    x, vu, vp, vs, nu = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(5))
    vs = vp + 0.02 * vs  # near the prompt, so mu and the threshold both matter
    p = {**PRESETS["strong"], "sld_guidance": 40.0}
    alpha, sigma = 0.3, (1 - 0.09) ** 0.5
    eps = [sigma * x + alpha * v for v in (vu, vp, vs)]
    gamma_ref, nu_ref = _reference(*eps, nu, p)
    gamma_v, nu_next = sld_term(vu, vp, vs, nu, p, k=alpha)
    assert torch.allclose(alpha * gamma_v, gamma_ref, atol=1e-12) and torch.allclose(nu_next, nu_ref, atol=1e-12)
    gamma_e, _ = sld_term(*eps, nu, p)  # an epsilon model: the rule as written
    assert torch.allclose(gamma_e, gamma_ref, atol=1e-12)
    # on the raw v outputs the rule differs (this is space=model)
    assert not torch.allclose(alpha * sld_term(vu, vp, vs, nu, p, k=1.0)[0], gamma_ref, atol=1e-3)


def test_sdxl_one_call_per_step_and_a_change(tmp_path):
    pipe = tiny_sdxl(tmp_path)
    edit = erasekit.erase(pipe, "star", method="sld", warmup=0)
    base = get_adapter(pipe).sample(["a star"], gens(), 2, W)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with edit.scoped(pipe):
            out = get_adapter(pipe).sample(["a star"], gens(), 2, W)
    finally:
        handle.remove()
    assert calls == [3, 3] and np.abs(out - base).max() > 1e-4


def test_registered_as_a_guard():
    m = get_method("sld")
    assert m is SLD and m.edit_kind == "hook" and m.family == "guard"
    assert isinstance(SLDHook("x", PRESETS["weak"]), Hook)
