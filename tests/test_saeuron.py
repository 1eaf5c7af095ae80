"""SAeUron: the score and selection formulas, the residual-preserving ablation (and the official
sign it fixes), steps matched by timestep, the SAE an edit carries, and one-line errors."""

import numpy as np
import pytest
import torch
from tiny import tiny_sd

import erasekit
from erasekit.adapters import get_adapter
from erasekit.edits import load_edit
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from erasekit.methods.saeuron import (
    SAeUron,
    SAeUronHook,
    ablate,
    groups_of,
    nearest_step,
    scores,
    selection,
)
from erasekit.sae import TopKSAE

#: a tiny fit (at the default site: unet-up-attn-0-1, the tiny UNet's up_blocks.0.attentions.1)
TINY = {"sae_latents": 64, "sae_k": 4, "sae_steps": 30, "num_inference_steps": 2,
        "guidance_scale": 5.0, "percentile": 90.0, "multiplier": -5.0}
SPEC = erasekit.ConceptSpec("star", preserve=("circle", "heart"))


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
    return erasekit.erase(pipe, SPEC, method="saeuron", **TINY)


def gens(n=1):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _sae(d=8, n=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k)
    sae.init_from(torch.randn(200, d, generator=g) + 1, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
    return sae


def test_scores_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(3, 2, 5, generator=g)  # groups x steps x features
    sizes = [4, 2, 6]
    s = scores(mu, 0, sizes)
    others = (2 * mu[1] + 6 * mu[2]) / 8  # the other groups' images pooled (official: concatenated latents)
    want = mu[0] / mu[0].sum(-1, keepdim=True) - others / others.sum(-1, keepdim=True)
    assert torch.allclose(s, want, atol=1e-6)
    with pytest.raises(InvalidInputError, match="other prompts"):
        scores(mu[:1], 0, [4])


def test_selection_by_percentile_scaling_and_threshold():
    mu = torch.tensor([[[4.0, 1.0, 1.0, 1.0, 0.5]], [[1.0, 1.0, 1.0, 1.0, 2.0]]])  # target, other; one step
    scale, thr = selection(mu, [0], [1, 1], 70.0, -3.0)
    s = scores(mu, 0, [1, 1])[0]
    chosen = s > torch.quantile(s, 0.7)
    assert chosen.tolist() == [True, False, False, False, False]
    assert torch.isfinite(thr[0]).tolist() == chosen.tolist()
    assert thr[0, 0] == pytest.approx(2.5)  # mean over groups (target included), as the official code
    assert scale[0, 0] == pytest.approx(-3.0 * 4.0) and (scale[0, 1:] == 0).all()  # gamma * mu_concept


def test_two_concepts_keep_the_larger_scaling_of_a_shared_feature():
    mu = torch.tensor([[[5.0, 1.0, 0.1]], [[4.0, 0.1, 1.0]], [[0.5, 1.0, 1.0]]])
    scale, thr = selection(mu, [0, 1], [1, 1, 1], 50.0, -1.0)
    assert torch.isfinite(thr[0, 0]) and scale[0, 0] == pytest.approx(-5.0)


def test_ablation_is_residual_preserving():
    """x + W_dec (z' - z): unselected features leave x bit for bit; the SAE's error is kept with the right sign."""
    sae = _sae()
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    none = torch.full((12,), float("inf"))
    assert torch.equal(ablate(x, sae, torch.zeros(12), none), x)
    z = sae.encode(x)
    j = int((z > 0).sum(0).argmax())
    thr = none.clone()
    thr[j] = 0.0
    scale = torch.zeros(12)
    scale[j] = -2.0
    out = ablate(x, sae, scale, thr)
    z2 = z.clone()
    z2[:, j] = torch.where(z[:, j] > 0, z[:, j] * -2.0, z[:, j])
    want = x + (z2 - z) @ sae.W_dec / sae.scale
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(out, sae.decode(z2) + (x - sae(x)), atol=1e-4)  # = x̂' + (x - x̂)
    official = sae.decode(z2) + (sae(x) - x)  # the official hook's x̂' + (x̂ - x)
    assert not torch.allclose(out, official, atol=1e-2)
    scale[j] = 1.0  # z' = z: the output is x, not the reconstruction
    assert torch.allclose(ablate(x, sae, scale, thr), x, atol=1e-5)


def test_groups_are_the_concept_and_each_other_phrase():
    names, prompts, targets = groups_of([erasekit.ConceptSpec("star", synonyms=("pentagram",), preserve=("circle",))],
                                        ("{}", "a {}"))
    assert names == ["star", "circle", ""] and targets == [0]
    assert prompts[0] == ["star", "a star", "pentagram", "a pentagram"] and prompts[1] == ["circle", "a circle"]


def test_edit_carries_its_sae_and_statistics(pipe, edit, tmp_path):
    t = edit.tensors()
    h = edit.manifest["hook"]
    assert h["site"] == "unet.up_blocks.0.attentions.1" and h["sae_source"] == "trained at fit"
    sae = TopKSAE.from_tensors(t, h["sae_config"])
    assert sae.digest() == h["sae_digest"] and sae.n_latents == 64
    assert t["mu"].shape == (4, 2, 64) and h["groups"] == ["star", "circle", "heart", ""]  # target, preserve, anchor
    assert t["timesteps"].tolist() == get_adapter(pipe).set_timesteps(2).tolist()
    assert all(n > 0 for n in edit.manifest["selected_per_step"])
    edit.save(tmp_path / "e")
    back = load_edit(tmp_path / "e")
    assert back.digest == edit.digest
    base = get_adapter(pipe).sample(["a photo of a star"], gens(), 2, 5.0)
    with back.scoped(pipe):
        changed = get_adapter(pipe).sample(["a photo of a star"], gens(), 2, 5.0)
    assert np.abs(changed - base).max() > 1e-4
    assert np.array_equal(get_adapter(pipe).sample(["a photo of a star"], gens(), 2, 5.0), base)


def test_steps_are_matched_by_timestep(pipe, edit):
    """Sampling with another step count than the fit's uses, at each step, the fit step nearest in timestep."""
    seen = []

    class Spy(SAeUronHook):
        def module_hooks(self, adapter):
            inner = super().module_hooks(adapter)[self.site]

            def fn(m, a, out):
                seen.append((self.index, self.t))
                return inner(m, a, out)
            return {self.site: fn}

    hook = SAeUron.make_hooks(edit, get_adapter(pipe))[0]
    spy = Spy(hook.sae, hook.site, hook.scale, hook.threshold, hook.timesteps)
    get_adapter(pipe).sample(["a star"], gens(), 5, 5.0, hooks=[spy])
    assert [i for i, _ in seen] == list(range(5))  # one guided UNet call per step, each knows its step
    fit_t = edit.tensors()["timesteps"]
    assert fit_t.tolist() == [501, 1] and [t for _, t in seen] == [801, 601, 401, 201, 1]  # DDIM's spacing
    assert [nearest_step(hook.timesteps, t) for _, t in seen] == [0, 0, 0, 1, 1]


def test_a_given_sae_is_used_and_checked(pipe, edit, tmp_path):
    h = edit.manifest["hook"]
    sae = TopKSAE.from_tensors(edit.tensors(), h["sae_config"])
    sae.save(tmp_path / "ok")
    again = erasekit.erase(pipe, SPEC, method="saeuron", **{**TINY, "sae": str(tmp_path / "ok"), "site": "unet-mid"})
    assert again.manifest["hook"]["site"] == h["site"]  # the SAE brings its own site
    assert again.manifest["hook"]["sae_digest"] == h["sae_digest"]
    assert torch.allclose(again.tensors()["mu"], edit.tensors()["mu"], atol=1e-5)

    def err(sae_dir, match):
        with pytest.raises(InvalidInputError, match=match) as e:
            erasekit.erase(pipe, SPEC, method="saeuron", **{**TINY, "sae": str(sae_dir)})
        assert "\n" not in str(e.value)

    other = TopKSAE(64, 64, 4, {**sae.meta, "model_fingerprint": "0" * 16})
    other.save(tmp_path / "other-model")
    err(tmp_path / "other-model", "another model")
    text = TopKSAE(32, 64, 4, {**sae.meta, "site": "text_encoder.encoder.layers.2"})
    text.save(tmp_path / "text-site")
    err(tmp_path / "text-site", "text encoder")
    narrow = TopKSAE(16, 64, 4, dict(sae.meta))
    narrow.save(tmp_path / "narrow")
    err(tmp_path / "narrow", "16-channel.*gives 64")
    err(tmp_path / "missing", "does not exist")


def test_fit_refuses_a_pipeline_with_a_guard_applied(pipe):
    guard = erasekit.erase(pipe, "moon", method="sld", warmup=0)
    with guard.scoped(pipe), pytest.raises(InvalidInputError, match="without hook edits"):
        erasekit.erase(pipe, SPEC, method="saeuron", **TINY)


@pytest.mark.parametrize("settings, match", [
    ({"percentile": 100.0}, "percentile.*below 100"),
    ({"percentile": 0.0}, "percentile.*above 0"),
    ({"percentile": 101.0}, "percentile.*at most 100"),
    ({"multiplier": 2.0}, "multiplier.*at most 0"),
    ({"site": "unet-up-attn-7-0"}, "unknown site 'unet-up-attn-7-0'"),
    ({"site": "text-encoder-layer-1"}, "text encoder"),
    ({"sae_k": 100, "sae_latents": 64}, "sae_k=100"),
    ({"templates": ["no slot"]}, "templates.*has no"),
])
def test_bad_settings_are_one_line_errors(pipe, settings, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        erasekit.erase(pipe, SPEC, method="saeuron", **{**TINY, **settings})
    assert "\n" not in str(err.value)


def test_registered_as_an_sae_method():
    m = get_method("saeuron")
    assert m is SAeUron and m.edit_kind == "hook" and m.family == "sae"


@pytest.mark.slow
def test_lowers_star_detection_on_the_world(world_pipe, classifier):
    """On the trained world model, SAeUron's world settings (with an SAE trained at fit time, smaller than
    the default recipe to keep this quick) take stars away and keep the other shapes."""
    from test_world_erasure import prompts_for, rate

    from erasekit.methods.saeuron import SAEURON_WORLD
    from erasekit.world.vocab import SHAPES, erase_templates

    others = tuple(s for s in SHAPES if s != "star")
    edit = erasekit.erase(world_pipe, erasekit.ConceptSpec("star", preserve=others), method="saeuron",
                          templates=erase_templates("shape")[:8], sae_steps=1000, **SAEURON_WORLD)
    stars, rest = prompts_for("shape", "star", 16, seed=1), {s: prompts_for("shape", s, 4, seed=2) for s in others}

    def measure():
        return (rate(world_pipe, classifier, stars, "shape", "star", 1000),
                sum(rate(world_pipe, classifier, p, "shape", s, 2000) for s, p in rest.items()) / len(rest))

    t0, o0 = measure()
    with edit.scoped(world_pipe):
        t1, o1 = measure()
    assert t0 - t1 >= 0.6, (t0, t1)
    assert o0 - o1 <= 0.1, (o0, o1)
