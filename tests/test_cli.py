import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text, text
    assert text.startswith("error:"), text
    assert len(text.splitlines()) == 1 or len(text) < 300, text
    return text


def test_missing_model_path(tmp_path: Path):
    msg = _one_line_error(run("generate", "a red circle", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "g.png")))
    assert "does not exist" in msg
    assert not (tmp_path / "g.png").exists()


def test_folder_that_is_not_a_pipeline(tmp_path: Path):
    (tmp_path / "junk").mkdir()
    msg = _one_line_error(run("generate", "a red circle", "--model", str(tmp_path / "junk"), "-o", str(tmp_path / "g.png")))
    assert "model_index.json" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any folder")
def test_unreadable_model_folder(tmp_path: Path):
    d = tmp_path / "locked"
    d.mkdir()
    (d / "model_index.json").write_text("{}")
    d.chmod(0)
    try:
        msg = _one_line_error(run("generate", "x", "--model", str(d), "-o", str(tmp_path / "g.png")))
        assert "permissions" in msg
    finally:
        d.chmod(0o755)


def test_corrupt_model_folder(tmp_path: Path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    msg = _one_line_error(run("generate", "x", "--model", str(d), "-o", str(tmp_path / "g.png")))
    assert "could not load" in msg


@pytest.mark.parametrize("index", [b"", b'{"_class_name": "StableDiffusionPipeline", "unet": [', b"\xff\xfe{}", b"[1, 2]"])
def test_a_truncated_or_non_json_model_index_is_one_line(tmp_path: Path, index: bytes):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "model_index.json").write_bytes(index)
    msg = _one_line_error(run("generate", "x", "--model", str(d), "-o", str(tmp_path / "g.png")))
    assert "model_index.json" in msg and "check the folder" in msg
    assert not (tmp_path / "g.png").exists()


def test_negative_count(tmp_path: Path):
    msg = _one_line_error(run("generate", "a red circle", "-n", "-3", "-o", str(tmp_path / "g.png")))
    assert "at least 1" in msg


def test_output_in_missing_directory(tmp_path: Path):
    msg = _one_line_error(run("generate", "a red circle", "-o", str(tmp_path / "missing" / "g.png")))
    assert "does not exist" in msg
    assert not (tmp_path / "missing").exists()


def test_unknown_image_suffix(tmp_path: Path):
    msg = _one_line_error(run("generate", "a red circle", "-o", str(tmp_path / "g.txt")))
    assert ".png" in msg


def test_generate_writes_a_grid(tmp_path: Path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = run("generate", "a crimson star on a grass background", "-n", "3", "--steps", "4", "-o", str(out))
    assert result.exit_code == 0, result.output
    im = Image.open(out)
    assert im.size[0] > 3 * 32 and im.size[1] >= 32
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left behind


def test_bad_set_override_is_one_line():
    from erasekit.config import apply_overrides
    from erasekit.errors import InvalidInputError
    from erasekit.world.train import TrainConfig

    assert apply_overrides(TrainConfig(), ["unet_steps=5", "lr=0.1"]).unet_steps == 5
    with pytest.raises(InvalidInputError, match="unknown setting"):
        apply_overrides(TrainConfig(), ["nope=1"])
    with pytest.raises(InvalidInputError, match="expected int"):
        apply_overrides(TrainConfig(), ["unet_steps=many"])


@pytest.mark.parametrize("pair,bound", [("threads=0", "at least 1"), ("probe_every=0", "at least 1"),
                                        ("batch_size=-2", "at least 1"), ("lr=0", "above 0"),
                                        ("uncond_p=1.5", "at most 1"), ("max_minutes=0", "above 0")])
def test_world_train_settings_are_range_checked_before_training(pair, bound):
    """`world train --set` values that would fail deep in torch (threads=0) or only after the judge and the
    renders are made (probe_every=0 divides by zero at the first probe) are refused up front."""
    from erasekit.config import apply_overrides
    from erasekit.errors import InvalidInputError
    from erasekit.world.train import TrainConfig

    with pytest.raises(InvalidInputError, match=f"{pair.split('=')[0]}.*{bound}"):
        apply_overrides(TrainConfig(), [pair])


def test_train_settings_name_their_device_and_reproduce_command(monkeypatch):
    import torch

    from erasekit.config import apply_overrides
    from erasekit.errors import ErasekitError
    from erasekit.world.train import TrainConfig, reproduce_command, resolve_device

    assert reproduce_command(TrainConfig()) == "erasekit world train -o world-model"
    cfg = apply_overrides(TrainConfig(seed=3), ["device=cuda", "compile=true", "unet_steps=50"])
    assert reproduce_command(cfg) == ("erasekit world train -o world-model --seed 3 --set unet_steps=50 --set compile=true "
                                      "--set device=cuda")
    sets = reproduce_command(cfg).split(" --set ")[1:]  # the command's settings rebuild the same config
    assert apply_overrides(TrainConfig(seed=3), sets) == cfg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ErasekitError, match="no GPU; use --set device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ErasekitError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_world_train_refuses_a_missing_output_directory_before_training(tmp_path):
    msg = _one_line_error(run("world", "train", "-o", str(tmp_path / "missing" / "wm")))
    assert "does not exist" in msg
    assert list(tmp_path.iterdir()) == []


def test_world_train_never_writes_the_shipped_model_or_a_users_folder_unasked(tmp_path):
    from erasekit.world.assets import model_path

    shipped = sorted((p.name, p.stat().st_mtime_ns) for p in model_path().iterdir())
    assert "-o DIR" in _one_line_error(run("world", "train"))
    assert "-o DIR" in _one_line_error(run("world", "train", "-o", str(tmp_path / "a"), "--update-shipped"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "already exists" in _one_line_error(run("world", "train", "-o", str(mine)))
    assert "did not write" in _one_line_error(run("world", "train", "-o", str(mine), "--overwrite"))
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model_path().iterdir()) == shipped


@pytest.mark.parametrize("device,expect", [("bogus", "unknown device"), ("meta", "not available here"),
                                           ("cuda:99", "GPU"), ("mps", "not available")])
def test_a_device_torch_cannot_use_is_one_line_before_loading(tmp_path: Path, device: str, expect: str):
    """`--device cuda` on a CPU-only torch (or a device torch cannot name) used to end in a traceback from
    inside torch; now it is one line naming the fix, and nothing is written."""
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    msg = _one_line_error(run("generate", "a red circle", "--device", device, "-o", str(tmp_path / "g.png")))
    assert expect in msg and ("--device cpu" in msg or "use cpu" in msg), msg
    assert not (tmp_path / "g.png").exists()
