"""The fine-tuning family's shared training loop and ESD, on tiny SD1.x / SDXL pipelines (code paths;
erasure quality is measured on the world model in test_world_finetune.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_sd, tiny_sdxl

from erasekit.adapters import get_adapter
from erasekit.cli import run
from erasekit.concepts import ConceptSpec
from erasekit.edits import load_edit
from erasekit.errors import InvalidInputError
from erasekit.methods import ESD, get_method
from erasekit.methods.finetune import select_params
from erasekit.training import Checkpoint, Trainable

FAST = dict(steps=3, ddim_steps=3, prefetch=2, lr=1e-3, checkpoint_every=2)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok_ft"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("tok_ftxl"))


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def unet_out(pipe, prompt="a star"):
    a = get_adapter(pipe)
    g = torch.Generator().manual_seed(0)
    h, w = a.image_size
    x = torch.randn(1, 4, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, generator=g)
    with torch.no_grad():
        return a.predict_noise(x, 500, a.encode([prompt]))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("rank", [0, 2])
def test_esd_contract(request, tmp_path, family, rank):
    pipe = request.getfixturevalue(family)
    before, out0 = weights(pipe), unet_out(pipe)
    edit = ESD(**FAST, rank=rank).fit(get_adapter(pipe), [ConceptSpec("star")], progress=False)
    after = weights(pipe)
    assert set(after) == set(before), "fitting left modules (adapters) behind"
    assert all(torch.equal(before[k], after[k]) for k in before), "fitting changed the pipeline"
    assert type(pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k) is torch.nn.Linear
    assert edit.kind == ("lora" if rank else "weight_delta")
    assert edit.manifest["training"]["steps"] == 3 and len(edit.manifest["training"]["loss"]["mean_by_tenth"]) == 3
    if rank == 0:  # only the trained tensors, all in cross-attention
        assert edit.tensors() and all(".attn2." in k for k in edit.tensors())
    edit.save(tmp_path / "e")
    loaded = load_edit(tmp_path / "e")
    assert loaded.digest == edit.digest and loaded.kind == edit.kind
    with loaded.scoped(pipe):
        out1 = unet_out(pipe)
    assert not torch.allclose(out0, out1), "the trained edit changes nothing"
    assert torch.equal(unet_out(pipe), out0)
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())


def test_esd_is_seeded(sd):
    a = get_adapter(sd)
    e1 = ESD(**FAST).fit(a, [ConceptSpec("star")], progress=False)
    e2 = ESD(**FAST).fit(a, [ConceptSpec("star")], progress=False)
    e3 = ESD(**FAST, seed=1).fit(a, [ConceptSpec("star")], progress=False)
    t1, t2, t3 = e1.tensors(), e2.tensors(), e3.tensors()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not all(torch.equal(t1[k], t3[k]) for k in t1)


def test_param_selections_follow_the_paper(sd):
    a = get_adapter(sd)
    x, strict, u = (set(select_params(a, w)) for w in ("x", "x-strict", "u"))
    assert strict < x and all(".attn2." in n for n in x)
    assert {n.split(".attn2.")[1].split(".")[0] for n in x} == {"to_q", "to_k", "to_v", "to_out"}
    assert {n.split(".attn2.")[1].split(".")[0] for n in strict} == {"to_k", "to_v"}
    assert not any(".attn2." in n for n in u)
    assert not any(n.startswith(("unet.time_embedding", "unet.conv_out")) for n in u)
    assert any(".attn1." in n for n in u) and any("resnets" in n for n in u)


@pytest.mark.parametrize("rank", [0, 2])
def test_frozen_passes_see_the_original_model(sd, rank):
    """Mid-training, ``frozen()`` gives the untrained model's outputs without a copy of it."""
    a = get_adapter(sd)
    out0 = unet_out(sd)
    tr = Trainable(sd, select_params(a, "x"), rank=rank, seed=0)
    try:
        with torch.no_grad():
            for p in tr.parameters():
                p.add_(0.05)
        assert not torch.allclose(unet_out(sd), out0)
        with tr.frozen():
            assert torch.equal(unet_out(sd), out0)
        assert not torch.allclose(unet_out(sd), out0)
    finally:
        tr.close()
    assert torch.equal(unet_out(sd), out0)


def interrupt(cls, cfg, adapter, ck, monkeypatch, at: int = 3) -> None:
    """Fit ``cls`` with a checkpoint and stop it (KeyboardInterrupt) when step ``at`` starts."""
    real = cls.loss

    def dying(self, adapter, state, trainable, step):
        if step == at:
            raise KeyboardInterrupt
        return real(self, adapter, state, trainable, step)

    monkeypatch.setattr(cls, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        cls(**cfg).fit(adapter, [ConceptSpec("star")], checkpoint=ck, progress=False)
    monkeypatch.setattr(cls, "loss", real)


def test_interrupted_run_resumes_to_the_same_edit(sd, tmp_path, monkeypatch):
    a = get_adapter(sd)
    cfg = dict(FAST, steps=5)
    ref = ESD(**cfg).fit(a, [ConceptSpec("star")], progress=False)
    ck = tmp_path / "run.checkpoint"
    interrupt(ESD, cfg, a, ck, monkeypatch)
    assert Checkpoint(ck).load()["step"] == 2
    with pytest.raises(InvalidInputError, match="--resume"):
        ESD(**cfg).fit(a, [ConceptSpec("star")], checkpoint=ck, progress=False)
    with pytest.raises(InvalidInputError, match="setting lr"):
        ESD(**dict(cfg, lr=2e-3)).fit(a, [ConceptSpec("star")], checkpoint=ck, resume=True, progress=False)
    with pytest.raises(InvalidInputError, match="concepts differ"):
        ESD(**cfg).fit(a, [ConceptSpec("heart")], checkpoint=ck, resume=True, progress=False)
    other = tiny_sd(tmp_path / "tok_other", seed=1)
    with pytest.raises(InvalidInputError, match="another run.*base"):
        ESD(**cfg).fit(get_adapter(other), [ConceptSpec("star")], checkpoint=ck, resume=True, progress=False)
    with pytest.raises(InvalidInputError, match="no checkpoint to resume"):
        ESD(**cfg).fit(a, [ConceptSpec("star")], checkpoint=tmp_path / "none.checkpoint", resume=True, progress=False)
    # a checkpoint written before a setting existed resumes as if it had recorded the setting's default
    state = Checkpoint(ck).load()
    ident = json.loads(state["identity"])
    del ident["config"]["trajectory_reuse"]
    Checkpoint(ck).save({**state, "identity": json.dumps(ident)})
    with pytest.raises(InvalidInputError, match="setting trajectory_reuse"):
        ESD(**cfg, trajectory_reuse=2).fit(a, [ConceptSpec("star")], checkpoint=ck, resume=True, progress=False)
    got = ESD(**cfg).fit(a, [ConceptSpec("star")], checkpoint=ck, resume=True, progress=False)
    assert got.manifest["training"]["resumed_at_step"] == 2
    assert all(torch.equal(ref.tensors()[k], got.tensors()[k]) for k in ref.tensors())
    assert ref.manifest["training"]["loss"] == got.manifest["training"]["loss"]


def test_progress_is_plain_lines_off_a_terminal(sd, capsys):
    ESD(**dict(FAST, steps=2)).fit(get_adapter(sd), [ConceptSpec("star")])
    err = capsys.readouterr().err
    assert "esd step 2/2 loss" in err and "it/s" in err


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(params="y"), "params"),
    (dict(mixed_precision="fp8"), "mixed_precision"), (dict(rank=-1), "rank")])
def test_bad_settings_are_one_line(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        ESD(**kw)


def test_bad_concepts_are_one_line(sd):
    a = get_adapter(sd)
    with pytest.raises(InvalidInputError, match="anchor"):
        ESD(**FAST).fit(a, [ConceptSpec("star", anchor="heart")], progress=False)
    with pytest.raises(InvalidInputError, match="erase_from"):
        ESD(**FAST, erase_from="star").fit(a, [ConceptSpec("star")], progress=False)
    with pytest.raises(InvalidInputError, match="itself as anchor"):
        ConceptSpec("star", anchor="star")


def _esd_rows(sd, chunk: int = 0, **kw):
    """The x_t, timesteps and frozen predictions ESD draws for one chunk of steps."""
    a = get_adapter(sd)
    m = ESD(**dict(FAST, steps=8, ddim_steps=6, **kw))
    tr = Trainable(sd, select_params(a, "x"), rank=0, seed=0)
    try:
        state = m.prepare(a, [ConceptSpec("star")], tr)
        return m._draw(a, state, tr, chunk)
    finally:
        tr.close()


def test_esd_batching_changes_no_draw(sd):
    """prefetch (how many trajectories run as one batch) changes what is computed together, not what is
    drawn: the same steps get the same x_t and the same frozen predictions."""
    one = [_esd_rows(sd, chunk=c, prefetch=1) for c in range(4)]
    four = _esd_rows(sd, prefetch=4)
    for field_ in ("x", "f_uncond", "f_concept"):
        assert torch.allclose(torch.cat([getattr(r, field_) for r in one]), getattr(four, field_), atol=1e-3, rtol=1e-3)
    assert torch.equal(torch.cat([r.t for r in one]), four.t)


def _counting(monkeypatch, sizes: list[int]):
    """Record the batch of every UNet call the adapter makes."""
    from erasekit.adapters.sd import SDAdapter

    real = SDAdapter.predict_noise

    def counted(self, x, t, enc, *a, **kw):
        sizes.append(len(x))
        return real(self, x, t, enc, *a, **kw)

    monkeypatch.setattr(SDAdapter, "predict_noise", counted)


@pytest.mark.parametrize("batch, reuse, erase_from, keep", [(1, 1, "", 0.0), (2, 1, "a heart", 0.0), (1, 2, "", 1.0),
                                                          (2, 2, "a heart", 1.0)])
def test_esd_lookahead_regroups_trajectories_by_stop_without_changing_a_draw(sd, monkeypatch, batch, reuse,
                                                                             erase_from, keep):
    """lookahead=L draws L batches' trajectories at once and regroups them by stopping step: every step gets
    the prompt, x_t and frozen predictions it gets without it (several prompts, a short last chunk), no UNet
    call is larger than prefetch's, and the batches, whose rows now stop close together, need fewer calls."""
    concepts = [ConceptSpec("star", synonyms=("pentagram",), neighbours=("heart", "circle"))]
    templates = ("{}", "a photo of a {}", "a red {}")

    def rows(chunk: int, **kw):
        a = get_adapter(sd)
        m = ESD(**dict(FAST, steps=7, ddim_steps=6, prefetch=2, batch_size=batch, trajectory_reuse=reuse,
                       erase_from=erase_from, preserve_weight=keep, templates=templates, **kw))
        tr = Trainable(sd, select_params(a, "x"), rank=0, seed=0)
        try:
            return m._draw(a, m.prepare(a, concepts, tr), tr, chunk)
        finally:
            tr.close()

    sizes: list[int] = []
    _counting(monkeypatch, sizes)
    plain = [rows(c) for c in range(-(-7 // (2 * reuse)))]  # the last chunk is short
    plain_sizes = sizes.copy()
    sizes.clear()
    ahead = rows(0, lookahead=4 // reuse)
    assert len(ahead.x) == 7 * batch
    assert len(set(ahead.prompt.tolist())) > 1
    fields = ("x", "f_uncond", "f_concept") + (("f_source",) if erase_from else ()) + (("f_keep",) if keep else ())
    for field_ in fields:
        assert torch.allclose(torch.cat([getattr(r, field_) for r in plain]), getattr(ahead, field_),
                              atol=1e-3, rtol=1e-3), field_
    for field_ in ("t", "prompt") + (("keep",) if keep else ()):
        assert torch.equal(torch.cat([getattr(r, field_) for r in plain]), getattr(ahead, field_)), field_
    assert max(sizes) <= max(plain_sizes) <= 2 * 2 * batch  # a guided call of prefetch=2 trajectories' rows
    # fewer calls wherever sorting can merge stops (these draws: 18 vs 21, 19 vs 22, 15 vs 16); with batch 2 and
    # trajectory_reuse 2 this chunk's two batches already stop alike (14 vs 14)
    assert len(sizes) < len(plain_sizes) if (batch, reuse) != (2, 2) else len(sizes) == len(plain_sizes)


@pytest.mark.parametrize("batch, erase_from", [(1, ""), (2, ""), (2, "a heart")])
def test_esd_trajectory_reuse_reads_one_trajectory_at_each_steps_stop(sd, monkeypatch, batch, erase_from):
    """With trajectory_reuse=2, step 1 takes x_t from step 0's trajectory (its prompt and noise) at step 1's
    own stopping step: what a fresh trajectory from step 0's draws, stopped at step 1's stop, gives."""
    import erasekit.methods.esd as esd_mod

    kw = dict(batch_size=batch, erase_from=erase_from)
    shared = _esd_rows(sd, prefetch=2, trajectory_reuse=2, **kw)  # steps 0-3: trajectories of steps 0 and 2
    fresh = _esd_rows(sd, prefetch=4, **kw)
    real = esd_mod.draw_example
    draws = [real(0, s, batch, 1, 6, tuple(fresh.x.shape[1:])) for s in range(4)]
    assert not torch.equal(draws[0][1], draws[1][1]), "pick a seed whose steps 0 and 1 stop apart"

    def grouped(seed, step, batch, n_prompts, ddim_steps, shape):
        p, s, z = real(seed, step, batch, n_prompts, ddim_steps, shape)
        lead = real(seed, step - step % 2, batch, n_prompts, ddim_steps, shape)
        return lead[0], s, lead[2]

    monkeypatch.setattr(esd_mod, "draw_example", grouped)
    expected = _esd_rows(sd, prefetch=4, **kw)
    for field_ in ("x", "f_uncond", "f_concept") + (("f_source",) if erase_from else ()):
        assert torch.allclose(getattr(shared, field_), getattr(expected, field_), atol=1e-3, rtol=1e-3), field_
    assert torch.equal(shared.t, fresh.t)  # every step keeps its own stopping step
    first = slice(0, batch)  # a group's first step is untouched; its second reads another trajectory
    assert torch.allclose(shared.x[first], fresh.x[first], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(shared.x[batch:2 * batch], fresh.x[batch:2 * batch], atol=1e-2)
    # the last chunk stops at the last step (8 steps in chunks of 6: steps 6 and 7, one trajectory)
    monkeypatch.setattr(esd_mod, "draw_example", real)
    tail = _esd_rows(sd, chunk=1, prefetch=3, trajectory_reuse=2, **kw)
    whole = _esd_rows(sd, prefetch=4, trajectory_reuse=2, **kw)
    assert len(tail.x) == 2 * batch
    assert torch.allclose(tail.x, whole.x[6 * batch:], atol=1e-3, rtol=1e-3)
    assert torch.equal(tail.t, whole.t[6 * batch:])
    with pytest.raises(InvalidInputError, match="trajectory_reuse"):
        ESD(**FAST, trajectory_reuse=2, xt_from="trained").fit(get_adapter(sd), [ConceptSpec("star")],
                                                               progress=False)


def _esd_rows_for(sd, concepts, **kw):
    a = get_adapter(sd)
    m = ESD(**dict(FAST, steps=8, ddim_steps=6, **kw))
    tr = Trainable(sd, select_params(a, "x"), rank=0, seed=0)
    try:
        state = m.prepare(a, concepts, tr)
        return m._draw(a, state, tr, 0), state
    finally:
        tr.close()


def test_esd_preservation_draws_its_own_prompts_and_frozen_targets(sd):
    """preserve_weight > 0 adds preserve prompts and the frozen model's predictions on them at the same x_t;
    every other draw stays what it was without the term, and the targets are the untrained model's."""
    concepts = [ConceptSpec("star", preserve=("a heart", "a circle"))]
    plain, _ = _esd_rows_for(sd, concepts, prefetch=4, batch_size=2)
    kept, state = _esd_rows_for(sd, concepts, prefetch=4, batch_size=2, preserve_weight=1.0)
    assert plain.keep is None and plain.f_keep is None
    for field_ in ("x", "t", "prompt", "f_uncond", "f_concept"):
        assert torch.equal(getattr(plain, field_), getattr(kept, field_)), field_
    assert state["keep"] == ["a heart", "a circle"]
    assert set(kept.keep.tolist()) == {0, 1}  # 8 rows: both prompts drawn with this seed
    a = get_adapter(sd)
    with torch.no_grad():
        direct = a.predict_noise(kept.x, kept.t, state["enc_keep"].index(kept.keep.tolist()))
    assert torch.allclose(direct, kept.f_keep, atol=1e-5)
    # without neighbour or preserve prompts the empty prompt is what is kept (as UCE preserves "")
    _, bare = _esd_rows_for(sd, [ConceptSpec("star")], prefetch=4, preserve_weight=1.0)
    assert bare["keep"] == [""]
    # what one concept erases another cannot keep (as UCE refuses it)
    with pytest.raises(InvalidInputError, match="erased by one concept and preserved by another"):
        _esd_rows_for(sd, [ConceptSpec("star", neighbours=("heart",)), ConceptSpec("heart")], preserve_weight=1.0)


def test_esd_preservation_term_is_zero_at_the_start_and_pulls_to_the_frozen_model(sd):
    """At step 0 the trained model is the frozen one, so the term adds nothing; once the weights move, the
    loss is ESD's plus preserve_weight x the distance of the preserve prompt's prediction from the frozen
    model's at the same x_t (what the term is; whether it keeps neighbours is measured on the world)."""
    a = get_adapter(sd)
    concepts = [ConceptSpec("star", preserve=("a heart",))]
    tr = Trainable(sd, select_params(a, "x"), rank=0, seed=0)
    try:
        plain, kept = ESD(**FAST, batch_size=2), ESD(**FAST, batch_size=2, preserve_weight=2.0)
        s_plain, s_kept = plain.prepare(a, concepts, tr), kept.prepare(a, concepts, tr)
        with torch.no_grad():
            assert float(plain.loss(a, s_plain, tr, 0)) == pytest.approx(float(kept.loss(a, s_kept, tr, 0)), rel=1e-5)
            for p in tr.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            rows = s_kept["rows"]
            sl = slice(0, 2)
            moved = a.predict_noise(rows.x[sl], rows.t[sl], s_kept["enc_keep"].index(rows.keep[sl].tolist()))
            term = torch.nn.functional.mse_loss(moved.float(), rows.f_keep[sl].float())
            assert float(term) > 0
            assert float(kept.loss(a, s_kept, tr, 0)) == pytest.approx(
                float(plain.loss(a, s_plain, tr, 0)) + 2.0 * float(term), rel=1e-4)
    finally:
        tr.close()
    e = ESD(**FAST, preserve_weight=1.0).fit(a, concepts, progress=False)
    assert e.manifest["esd_preserve_prompts"] == 1 and e.manifest["config"]["preserve_weight"] == 1.0


def test_esd_options_run(sd):
    """erase_from, CompVis sampling with the trained model, and mixed precision take their own paths."""
    a = get_adapter(sd)
    for kw in (dict(erase_from="a heart"), dict(xt_from="trained"), dict(mixed_precision="bf16"),
               dict(preserve_weight=1.0, xt_from="trained"), dict(preserve_weight=1.0, trajectory_reuse=2),
               dict(params="u", rank=1), dict(gradient_checkpointing=True), dict(trajectory_reuse=3, batch_size=2)):
        e = ESD(**dict(FAST, steps=2), **kw).fit(a, [ConceptSpec("star")], progress=False)
        assert e.tensors() and all(torch.isfinite(t).all() for t in e.tensors().values()), kw
    assert get_method("esd") is ESD


@pytest.mark.parametrize("kw", [pytest.param({}, marks=pytest.mark.slow),
                                pytest.param(dict(rank=2, xt_from="trained"), marks=pytest.mark.slow)],
                         ids=["full-frozen", "lora-trained"])  # 19-21 s each on 2 cores: a GPU feature, kept out of the default run
def test_esd_compile_routes_every_no_gradient_call_through_the_compiled_unet(sd, monkeypatch, kw):
    """compile=true sends the calls that draw x_t and the frozen predictions through torch.compile (here a
    recording backend that runs the captured graph as is), leaves the trained pass eager, does not compile
    again for shrinking batches or a second fit, and fits the edit the eager run fits: with the trained
    tensors swapped for their originals (full) or adapters switched off (LoRA), and with the trained model
    sampling (xt_from=trained)."""
    import erasekit.methods.esd as esd_mod

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(esd_mod, "COMPILE_BACKEND", backend)
    a = get_adapter(sd)
    calls = {"compiled": 0, "eager": 0}
    real = a.predict_noise

    def spy(*args, **kwargs):
        calls["compiled" if a._unet_fn is not None else "eager"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(a, "predict_noise", spy)
    concepts = [ConceptSpec("star", neighbours=("heart",))]
    plain = ESD(**FAST, **kw).fit(a, concepts, progress=False).tensors()
    assert calls["compiled"] == 0
    calls.update(eager=0)
    fast = ESD(**FAST, **kw, compile=True).fit(a, concepts, progress=False)
    assert fast.manifest["config"]["compile"] is True
    assert calls["eager"] == FAST["steps"] and calls["compiled"] > calls["eager"], calls  # one trained pass a step
    for k, v in plain.items():
        assert torch.allclose(v, fast.tensors()[k], atol=1e-6, rtol=1e-5), k
    n = len(graphs)
    ESD(**FAST, **kw, compile=True, seed=1).fit(a, concepts, progress=False)  # another fit on the same UNet
    assert 1 <= n <= 4 and len(graphs) == n  # a dynamic batch compiles once or twice, the next fit not at all
    assert a._unet_fn is None  # the route ends with the fit


def test_a_resume_may_switch_compile_but_not_what_is_computed():
    """compile changes how the draws are computed, not what: a run started compiled may be resumed eagerly
    (after a compiler failure, say); any setting that changes the objective is still refused."""
    from erasekit.methods.base import config_dict
    from erasekit.training.loop import _mismatch, identity_of

    def ident(**kw):
        return identity_of("esd", ESD.Config(**kw), [ConceptSpec("star")], "abc", [])

    defaults = config_dict(ESD.Config())
    assert _mismatch(ident(compile=True), ident(compile=False), defaults) is None
    assert _mismatch(ident(compile=True), ident(compile=False, lr=1e-3), defaults) == "setting lr was 1e-05, now 0.001"


# ---------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def model_dir(sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    sd.save_pretrained(d)
    return d


def cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", "from erasekit.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **kw)


def test_sigkilled_run_resumes_to_the_same_edit(model_dir, tmp_path):
    """A run killed with SIGKILL mid-way and resumed gives the edit an uninterrupted run gives."""
    args = ["erase", "--method", "esd", "--concept", "star", "--model", str(model_dir), "--device", "cpu",
            "--set", "steps=60", "--set", "ddim_steps=6", "--set", "prefetch=2", "--set", "lr=1e-3",
            "--set", "checkpoint_every=4"]
    ref = cli(*args, "-o", str(tmp_path / "ref"))
    killed = cli(*args, "-o", str(tmp_path / "out"))
    ck = tmp_path / "out.checkpoint"
    deadline = time.time() + 120
    while not ck.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert ck.exists() and not (tmp_path / "out").exists(), "a killed run left a half-written edit"
    step = Checkpoint(ck).load()["step"]
    assert 0 < step < 60
    resumed = cli(*args, "-o", str(tmp_path / "out"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert not ck.exists(), "the checkpoint outlived the finished edit"
    a, b = load_file(tmp_path / "ref" / "edit.safetensors"), load_file(tmp_path / "out" / "edit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_edit(tmp_path / "out").manifest["training"]["resumed_at_step"] == step


def test_cli_refusals(model_dir, tmp_path, capsys):
    base = ["erase", "--method", "esd", "--concept", "star", "--model", str(model_dir), "--device", "cpu",
            "--set", "steps=2", "--set", "ddim_steps=2"]
    (tmp_path / "exists").mkdir()
    assert run([*base, "-o", str(tmp_path / "exists")]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert run([*base, "--set", "steps=0", "-o", str(tmp_path / "o")]) != 0
    assert "steps" in capsys.readouterr().err
    (tmp_path / "o.checkpoint").write_text("not ours")
    assert run([*base, "-o", str(tmp_path / "o"), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "not a readable erasekit checkpoint" in err and len(err.strip().splitlines()) == 1
    assert "--overwrite" not in err  # which would refuse it again: no advice in a circle
    assert run([*base, "-o", str(tmp_path / "o"), "--overwrite"]) != 0, "a file we did not write was replaced"
    assert "move or delete it yourself" in capsys.readouterr().err
    assert (tmp_path / "o.checkpoint").read_text() == "not ours"
    assert run(["erase", "--method", "uce", "--concept", "star", "--resume", "-o", str(tmp_path / "u")]) != 0
    assert "fine-tuning" in capsys.readouterr().err
    assert run([*base, "-o", str(tmp_path / "fresh"), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fresh").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run(["erase", "--method", "esd", "--concept", "star", "--model", str(model_dir), "--device", "cpu",
                    "--set", "steps=2", "--set", "ddim_steps=2", "-o", str(ro / "p")]) != 0
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------- the rest of the family
FAMILY = {
    "ablating-concepts": (dict(steps=2, batch_size=2, n_images=2, lr=1e-3), ConceptSpec("star", anchor="heart")),
    "ablating-concepts/noise+prior": (dict(steps=2, batch_size=2, n_images=2, lr=1e-3, loss="noise", prior=True),
                                      ConceptSpec("star", anchor="heart")),
    "ablating-concepts/embedding": (dict(steps=2, batch_size=2, n_images=2, lr=1e-2, params="embedding",
                                         target_from="frozen"), ConceptSpec("star", anchor="heart")),
    "salun": (dict(steps=2, batch_size=2, n_images=2, lr=1e-3), ConceptSpec("star", preserve=("circle",))),
    "fs-te": (dict(steps=2, n_images=2, lr=1e-3), ConceptSpec("star")),
}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("case", sorted(FAMILY))
def test_family_contract(request, tmp_path, family, case):
    pipe = request.getfixturevalue(family)
    kw, spec = FAMILY[case]
    before, out0 = weights(pipe), unet_out(pipe)
    edit = get_method(case.split("/")[0])(**kw).fit(get_adapter(pipe), [spec], progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items()), "fitting changed the pipeline"
    assert edit.kind == "weight_delta" and edit.tensors()
    assert any(float(t.abs().max()) > 0 for t in edit.tensors().values()), "nothing was trained"
    edit.save(tmp_path / "e")
    loaded = load_edit(tmp_path / "e")
    assert loaded.digest == edit.digest
    with loaded.scoped(pipe):
        assert not torch.allclose(unet_out(pipe), out0)
    assert torch.equal(unet_out(pipe), out0)
    if case == "fs-te":
        assert all(k.startswith("text_encoder") for k in edit.tensors())
    if case.endswith("embedding"):  # only the target's own token rows moved
        (delta,) = [t for k, t in edit.tensors().items() if k.startswith("text_encoder.")]
        moved = set(torch.nonzero(delta.abs().sum(-1)).flatten().tolist())
        assert moved and moved <= set(edit.manifest["embedding_rows_trained"])


def test_salun_mask_keeps_the_largest_saliencies():
    from erasekit.methods.salun import saliency_mask

    g = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[2.0, -0.01], [0.2, 7.0]])}
    masks, stats = saliency_mask(g, 0.5)  # 7 entries: round(3.5) = 4 kept, the four largest |g|
    assert masks["a"].tolist() == [False, True, True] and masks["b"].tolist() == [[True, False], [False, True]]
    assert stats["kept"] == 4 and abs(stats["kept_fraction"] - 4 / 7) < 1e-9
    top, _ = saliency_mask(g, 0.15)  # one entry: the largest
    assert top["b"].tolist() == [[False, False], [False, True]] and not top["a"].any()
    all_kept, _ = saliency_mask(g, 1.0)
    assert all(m.all() for m in all_kept.values())


def test_salun_trains_only_inside_its_mask(sd):
    edit = get_method("salun")(steps=2, batch_size=2, n_images=2, lr=1e-3, mask_ratio=0.1).fit(
        get_adapter(sd), [ConceptSpec("star")], progress=False)
    moved = sum(int((t != 0).sum()) for t in edit.tensors().values())
    total = sum(t.numel() for t in edit.tensors().values())
    assert 0 < moved <= edit.manifest["mask_stats"]["kept"] and moved / total <= 0.1 + 1e-6


def test_family_refusals(sd):
    a = get_adapter(sd)
    with pytest.raises(InvalidInputError, match="--anchor"):
        get_method("ablating-concepts")(steps=1).fit(a, [ConceptSpec("star")], progress=False)
    with pytest.raises(InvalidInputError, match="rank=0"):
        get_method("salun")(steps=1, rank=2).fit(a, [ConceptSpec("star")], progress=False)


ADV = dict(steps=3, ddim_steps=3, prefetch=2, lr=1e-3, warmup=1, attack_steps=2, checkpoint_every=2)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("retain", ["iter", "reg"])
def test_advunlearn_contract(request, tmp_path, family, retain):
    pipe = request.getfixturevalue(family)
    before, out0 = weights(pipe), unet_out(pipe)
    edit = get_method("advunlearn")(**ADV, retain=retain).fit(get_adapter(pipe), [ConceptSpec("star")], progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())
    assert edit.kind == "weight_delta" and all(k.startswith("text_encoder") for k in edit.tensors())
    assert edit.manifest["attacks"] == 2
    edit.save(tmp_path / "e")
    with load_edit(tmp_path / "e").scoped(pipe):
        assert not torch.allclose(unet_out(pipe), out0)
    assert torch.equal(unet_out(pipe), out0)


def test_advunlearn_inner_attack_lowers_its_objective(sd):
    from erasekit.methods.advunlearn import AdvUnlearn

    a = get_adapter(sd)
    m = AdvUnlearn(**dict(ADV, attack_steps=8, attack_lr=5e-2))
    tr = Trainable(sd, m.trained_params(a), seed=0)
    try:
        state = m.prepare(a, [ConceptSpec("star")], tr)
        rows = m._draw(a, state, tr, 0)
        prompts = [state["prompts"][i] for i in rows.prompt[:1].tolist()]
        delta, path = m.run_attack(a, tr, prompts, state["delta"], rows.x[:1], rows.t[:1], rows.f_concept[:1] * 0 + 1)
        assert path[-1] < path[0], path
        assert not torch.equal(delta[0], state["delta"][0])
        assert all(p.grad is None for p in tr.parameters()), "the attack moved gradients into the model"
    finally:
        tr.close()


def test_advunlearn_prefix_must_fit_the_context(sd):
    from erasekit.methods.advunlearn import with_prefix

    a = get_adapter(sd)
    long = " ".join(["star"] * 74)
    with pytest.raises(InvalidInputError, match="prefix_k"):
        with_prefix(a, [long], [torch.zeros(4, 32)])


def test_advunlearn_resume_carries_the_adversarial_prefix(sd, tmp_path, monkeypatch):
    from erasekit.methods.advunlearn import AdvUnlearn

    a = get_adapter(sd)
    cfg = dict(ADV, steps=4)
    ref = AdvUnlearn(**cfg).fit(a, [ConceptSpec("star")], progress=False)
    interrupt(AdvUnlearn, cfg, a, tmp_path / "c", monkeypatch)
    assert "delta0" in Checkpoint(tmp_path / "c").load()["extra"]
    got = AdvUnlearn(**cfg).fit(a, [ConceptSpec("star")], checkpoint=tmp_path / "c", resume=True, progress=False)
    assert all(torch.equal(ref.tensors()[k], got.tensors()[k]) for k in ref.tensors())
