"""The TopK SAE, its activation collection and its training."""

from __future__ import annotations

import json

import pytest
import torch

from erasekit.errors import InvalidInputError
from erasekit.sae import WORLD_SITE, SAEConfig, TopKSAE, collect, fit, load_record


def _sae(d: int = 16, n: int = 48, k: int = 5, seed: int = 0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k, {"site": "test"})
    sae.init_from(torch.randn(256, d, generator=g) * 3 + 1, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
    return sae


def _synthetic(n_tokens: int = 20000, d: int = 32, n: int = 64, seed: int = 1) -> torch.Tensor:
    """Tokens made of 3 atoms of a random unit-norm dictionary with positive coefficients, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n_tokens, n, generator=g).argsort(dim=1)[:, :3]
    codes = torch.zeros(n_tokens, n).scatter(1, idx, torch.rand(n_tokens, 3, generator=g) * 2 + 0.5)
    return codes @ atoms + 0.5


def test_topk_keeps_exactly_k_nonzeros_per_row():
    sae = _sae(k=5)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3)) * 4
    pre = sae.pre_acts(x)
    assert ((pre > 0).sum(1) > 5).all()  # so that exactly k is a real check, not a ReLU accident
    z = sae.encode(x)
    assert ((z != 0).sum(1) == 5).all()
    assert (z >= 0).all()
    # the kept entries are each row's 5 largest pre-activations
    assert torch.equal(z.topk(5, dim=1).values, pre.topk(5, dim=1).values)


def test_decoder_rows_have_unit_norm_after_a_step():
    x = _synthetic(2000, d=32)
    sae, _ = fit(x, SAEConfig(n_latents=64, k=4, steps=1, batch_size=128, lr=1e-2))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    sae2, _ = fit(x, SAEConfig(n_latents=64, k=4, steps=7, batch_size=128, lr=1e-2, seed=2))
    assert torch.allclose(sae2.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_auxk_loss_only_with_dead_latents_and_trains_them():
    sae = _sae()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    assert float(sae.losses(x, None)["aux"]) == 0.0
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:10] = True
    out = sae.losses(x, dead, aux_k=4)
    assert float(out["aux"].detach()) > 0
    (out["aux"]).backward()
    assert sae.W_enc.grad[:, 10:].abs().sum() == 0 and sae.W_enc.grad[:, :10].abs().sum() > 0


def test_learns_a_synthetic_sparse_dictionary():
    x = _synthetic()
    cfg = SAEConfig(n_latents=128, k=4, steps=400, batch_size=256, lr=3e-3, dead_tokens=5000)
    sae, record = fit(x, cfg)
    assert record["fve"] >= 0.9
    assert record["l0"] == pytest.approx(4.0)
    assert record["steps"] == 400 and record["wall_time_s"] > 0
    again, record2 = fit(x, cfg)  # seeded
    assert torch.equal(sae.W_dec, again.W_dec) and record2["fve"] == record["fve"]


def test_save_load_round_trip_is_bit_exact(tmp_path):
    sae = _sae()
    record = {"steps": 3, "fve": 0.5, "dead_fraction": 0.0, "wall_time_s": 0.1}
    sae.save(tmp_path / "sae", record)
    back = TopKSAE.load(tmp_path / "sae")
    for name, t in sae.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    assert (back.d_in, back.n_latents, back.k, back.meta) == (16, 48, 5, {"site": "test"})
    assert load_record(tmp_path / "sae") == record
    x = torch.randn(10, 16)
    assert torch.equal(sae(x), back(x))


def test_bad_folder_is_a_one_line_error(tmp_path):
    def err(path) -> str:
        with pytest.raises(InvalidInputError) as e:
            TopKSAE.load(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "config.json" in err(tmp_path / "empty")
    _sae().save(tmp_path / "good")
    cfg_file = tmp_path / "good" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "n_latents": 49}))
    assert "does not match" in err(tmp_path / "good")
    cfg_file.write_text("{not json")
    assert "unreadable" in err(tmp_path / "good")
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "good" / "sae.safetensors").write_bytes(b"\x00garbage")
    assert "corrupt" in err(tmp_path / "good")


def test_bad_config_and_data_are_one_line_errors():
    x = _synthetic(100)
    with pytest.raises(InvalidInputError, match="k=65"):
        fit(x, SAEConfig(n_latents=64, k=65))
    with pytest.raises(InvalidInputError, match="steps=0"):
        fit(x, SAEConfig(steps=0))
    with pytest.raises(InvalidInputError, match="tokens"):
        fit(x[0], SAEConfig())


@pytest.fixture(scope="module")
def world(world_pipe):
    from erasekit.adapters import get_adapter

    return get_adapter(world_pipe)


def test_capture_at_the_world_site(world):
    site = world.pipe.unet.get_submodule(WORLD_SITE.removeprefix("unet."))
    before = len(site._forward_hooks)
    acts = collect(world, WORLD_SITE, ["a red circle", "a blue star on a grass background"], num_inference_steps=3,
                   guidance_scale=2.0, per_call=None)
    # 4x4 tokens of 128 channels, for [uncond, cond] x 2 prompts, at each of the 3 steps
    assert acts.x.shape == (3 * 2 * 2 * 4 * 4, 128)
    assert acts.step.tolist() == [i for i in range(3) for _ in range(2 * 2 * 16)]
    assert len(site._forward_hooks) == before
    sub = collect(world, WORLD_SITE, ["a red circle"], num_inference_steps=2, per_call=20)
    assert sub.x.shape == (40, 128) and len(site._forward_hooks) == before
    again = collect(world, WORLD_SITE, ["a red circle"], num_inference_steps=2, per_call=20)
    assert torch.equal(sub.x, again.x)  # seeded generation and subsample


def test_capture_errors(world):
    with pytest.raises(InvalidInputError, match="empty"):
        collect(world, WORLD_SITE, [])
    with pytest.raises(InvalidInputError, match="no module"):
        collect(world, "unet.up_blocks.9", ["a red circle"])


def test_check_for_model_and_site(world):
    sae = TopKSAE(128, 256, 8, {"site": WORLD_SITE, "model_fingerprint": world.fingerprint()})
    sae.check_for(world, WORLD_SITE, 128)
    with pytest.raises(InvalidInputError, match="site"):
        sae.check_for(world, "unet.up_blocks.1.attentions.1")
    with pytest.raises(InvalidInputError, match="another model"):
        TopKSAE(128, 256, 8, {"site": WORLD_SITE, "model_fingerprint": "0" * 16}).check_for(world, WORLD_SITE)
    with pytest.raises(InvalidInputError, match="64-channel"):
        TopKSAE(64, 256, 8, {"site": WORLD_SITE}).check_for(world, WORLD_SITE, 128)


def test_sae_train_command_writes_a_loadable_sae(tmp_path, monkeypatch):
    from erasekit.cli import run
    from erasekit.sae import TopKSAE, load_record

    monkeypatch.chdir(tmp_path)
    assert run(["sae", "train", "-o", "sae", "--n-prompts", "2", "--set", "steps=5", "--set", "n_latents=32",
                "--set", "k=4", "--set", "num_inference_steps=2"]) == 0
    sae = TopKSAE.load(tmp_path / "sae")
    record = load_record(tmp_path / "sae")
    assert sae.n_latents == 32 and record["site"] == "unet.up_blocks.0.attentions.1" and record["steps"] == 5


# ---------------------------------------------------------------------- BatchTopK
def test_batch_topk_trains_on_k_times_batch_and_encodes_each_token_alone(tmp_path):
    x = _synthetic(6000, d=32)
    cfg = SAEConfig(n_latents=96, k=4, steps=150, batch_size=128, lr=3e-3, batch_topk=True, dead_tokens=3000)
    sae, record = fit(x, cfg)
    pre = sae.pre_acts(x[:64])
    kept = sae.train_codes(pre)
    assert int((kept > 0).sum()) == 4 * 64  # the batch keeps k x rows, not k per row
    assert ((kept > 0).sum(1) != 4).any()
    assert record["threshold"] > 0 and float(sae.threshold) == record["threshold"]
    z = sae.encode(x[:64])
    assert torch.equal(z, pre * (pre > sae.threshold))
    assert torch.allclose(sae.encode(x[5:6]), z[5:6])  # a token's code does not depend on its batch
    assert record["fve"] > 0.6 and 1 <= record["l0"] <= 12
    sae.save(tmp_path / "b")
    back = TopKSAE.load(tmp_path / "b")
    assert back.batch_topk and float(back.threshold) == float(sae.threshold) and torch.equal(back.encode(x[:8]), z[:8])
    assert not TopKSAE.load(_plain_saved(tmp_path)).batch_topk


def _plain_saved(tmp_path):
    _sae().save(tmp_path / "plain")
    return tmp_path / "plain"


# ---------------------------------------------------------------------- resuming
class _Kill(Exception):
    pass


def _stop_at(step_to_die: int):
    def progress(stage, done, total):
        if stage == "train" and done == step_to_die:
            raise _Kill()
    return progress


def test_resumed_training_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path):
    from erasekit.sae import Checkpoint

    x = _synthetic(4000, d=32)
    cfg = SAEConfig(n_latents=64, k=4, steps=40, batch_size=256, lr=3e-3, checkpoint_every=10, dead_tokens=500)
    whole, record = fit(x, cfg)
    ck = Checkpoint(tmp_path / "ck")
    ck.start({"run": 1}, resume=False)
    with pytest.raises(_Kill):
        fit(x, cfg, progress=_stop_at(27), checkpoint=ck)  # killed after the checkpoint of step 20
    state = ck.load_state()
    assert state["step"] == 20
    assert ck.start({"run": 1}, resume=True)
    resumed, record2 = fit(x, cfg, checkpoint=ck, resume_state=state)
    for name, t in whole.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    assert record2["fve"] == record["fve"] and record2["resumed_at_step"] == 20


def test_checkpoint_folder_rules(tmp_path):
    from erasekit.errors import OutputPathError
    from erasekit.sae import Checkpoint

    ck = Checkpoint(tmp_path / "ck")
    with pytest.raises(InvalidInputError, match="no checkpoint to resume.*without --resume"):
        ck.start({"a": 1}, resume=True)
    assert ck.start({"a": 1}, resume=False) is False
    with pytest.raises(OutputPathError, match="pass --resume"):
        Checkpoint(tmp_path / "ck").start({"a": 1}, resume=False)
    with pytest.raises(InvalidInputError, match="another run .*a differs"):
        Checkpoint(tmp_path / "ck").start({"a": 2}, resume=True)
    (tmp_path / "ck" / "mine.txt").write_text("keep")
    ck.remove()
    assert (tmp_path / "ck" / "mine.txt").is_file() and not (tmp_path / "ck" / "run.json").exists()


# ---------------------------------------------------------------------- sites by role
def test_sites_by_role_on_the_world(world):
    sites = world.sites()
    assert sites["unet-up-attn-0-1"] == WORLD_SITE  # SAeUron's SD1.x site, the same role on the world
    assert world.site("unet-up-attn-0-1") == WORLD_SITE and world.site(WORLD_SITE) == WORLD_SITE
    assert world.site("unet-up-attn-1-1") == "unet.up_blocks.1.attentions.1"
    assert world.site("text-encoder-layer-2").endswith("encoder.layers.2")
    assert sites["unet-mid"] == "unet.mid_block.attentions.0"
    for bad in ("unet-up-attn-1-7", "text-encoder-layer-9", "nonsense", "unet.up_blocks.9"):
        with pytest.raises(InvalidInputError) as e:
            world.site(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidInputError, match="unet-up-attn-0-0..1.*text-encoder-layer-0..3"):
        world.site("unet-up-attn-1-7")


def test_saeuron_role_on_the_sd1_layout(tmp_path):
    """SD1.x's up block 0 has no transformer: SAeUron's up_blocks.1.attentions.1 is unet-up-attn-0-1 there."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from tiny import tiny_sd

    from erasekit.adapters.sd import SDAdapter

    unet = UNet2DConditionModel(block_out_channels=(32, 32, 32, 32), layers_per_block=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
                                norm_num_groups=32, attention_head_dim=4)
    sites = SDAdapter(SimpleNamespace(unet=unet, text_encoder=tiny_sd(tmp_path).text_encoder)).sites()
    assert sites["unet-up-attn-0-1"] == "unet.up_blocks.1.attentions.1"  # objects
    assert sites["unet-up-attn-0-2"] == "unet.up_blocks.1.attentions.2"  # styles
    assert sites["unet-up-attn-2-2"] == "unet.up_blocks.3.attentions.2" and "unet-up-attn-3-0" not in sites
    assert sites["unet-down-attn-0-0"] == "unet.down_blocks.0.attentions.0"


def test_sites_on_tiny_sd_and_sdxl(tmp_path):
    from tiny import tiny_sd, tiny_sdxl

    from erasekit.adapters import get_adapter

    sd, xl = get_adapter(tiny_sd(tmp_path / "a")), get_adapter(tiny_sdxl(tmp_path / "b"))
    assert sd.site("unet-up-attn-0-2") == "unet.up_blocks.0.attentions.2"
    assert "text-encoder-2-layer-4" in xl.sites() and "text-encoder-2-layer-0" not in sd.sites()
    assert xl.site("text-encoder-2-layer-1").startswith("text_encoder_2.")


def test_text_encoder_site_collects_every_position(world):
    from erasekit.sae import collect_text

    site = world.site("text-encoder-layer-2")
    mod = world.pipe.text_encoder.get_submodule(site.removeprefix("text_encoder."))
    before = len(mod._forward_hooks)
    acts = collect_text(world, site, ["a red circle", "a blue star", "a star"], batch_size=2)
    length = world.pipe.tokenizer.model_max_length
    assert acts.x.shape == (3 * length, 128) and (acts.step == -1).all()
    assert len(mod._forward_hooks) == before
    ref = []
    h = mod.register_forward_hook(lambda m, a, out: ref.append((out[0] if isinstance(out, tuple) else out)[0]))
    try:
        world.encode(["a blue star"])
    finally:
        h.remove()
    assert torch.allclose(acts.x[length:2 * length], ref[0].float())


def test_sae_train_command_at_a_text_site_and_bad_sites(tmp_path, monkeypatch, capsys):
    from erasekit.cli import run

    monkeypatch.chdir(tmp_path)
    assert run(["sae", "train", "-o", "te", "--site", "text-encoder-layer-2", "--n-prompts", "5", "--set", "steps=5",
                "--set", "n_latents=32", "--set", "k=4"]) == 0
    sae = TopKSAE.load(tmp_path / "te")
    assert sae.meta["site"].endswith("encoder.layers.2") and sae.meta["site_name"] == "text-encoder-layer-2"
    assert load_record(tmp_path / "te")["tokens"] == 5 * 20
    assert not (tmp_path / "te.checkpoint").exists()
    capsys.readouterr()
    assert run(["sae", "train", "-o", "bad", "--site", "unet-up-attn-4-0", "--n-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown site 'unet-up-attn-4-0'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_sae_train_command_resumes_a_killed_run(tmp_path, monkeypatch, capsys):
    from erasekit.cli import _sae_prompts, run
    from erasekit.sae import train_sae

    monkeypatch.chdir(tmp_path)
    args = ["--n-prompts", "2", "--set", "steps=12", "--set", "n_latents=32", "--set", "k=4", "--set",
            "num_inference_steps=2", "--set", "checkpoint_every=4"]
    cfg = SAEConfig(steps=12, n_latents=32, k=4, num_inference_steps=2, checkpoint_every=4)
    from erasekit.adapters import get_adapter
    from erasekit.models import load_pipeline

    with pytest.raises(_Kill):
        train_sae(get_adapter(load_pipeline(None, device="cpu")), "unet-up-attn-0-1", _sae_prompts(None, None, 2, 0), cfg,
                  progress=_stop_at(10), checkpoint=tmp_path / "s.checkpoint")
    assert (tmp_path / "s.checkpoint" / "state.pt").is_file()
    assert run(["sae", "train", "-o", "s", *args]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run(["sae", "train", "-o", "s", *args, "--set", "lr=0.001", "--resume"]) == 2
    assert "another run" in capsys.readouterr().err
    assert run(["sae", "train", "-o", "s", *args, "--resume"]) == 0
    assert load_record(tmp_path / "s")["resumed_at_step"] == 8
    assert not (tmp_path / "s.checkpoint").exists()
