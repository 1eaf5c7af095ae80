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
    # 8x8 tokens of 128 channels, for [uncond, cond] x 2 prompts, at each of the 3 steps
    assert acts.x.shape == (3 * 2 * 2 * 8 * 8, 128)
    assert acts.step.tolist() == [i for i in range(3) for _ in range(2 * 2 * 64)]
    assert len(site._forward_hooks) == before
    sub = collect(world, WORLD_SITE, ["a red circle"], num_inference_steps=2, per_call=50)
    assert sub.x.shape == (100, 128) and len(site._forward_hooks) == before
    again = collect(world, WORLD_SITE, ["a red circle"], num_inference_steps=2, per_call=50)
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
        sae.check_for(world, "unet.up_blocks.0.attentions.1")
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
    assert sae.n_latents == 32 and record["site"] == "unet.up_blocks.1.attentions.1" and record["steps"] == 5
