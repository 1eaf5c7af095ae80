"""erase -> generate --patch -> export, through the CLI, on the embedded world model."""

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.edits import load_patch
from erasekit.world.assets import model_path

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_methods_lists_every_method():
    r = run("methods")
    assert r.exit_code == 0
    for name in ("uce", "rece", "speed", "mace", "realera"):
        assert name in r.output


def test_erase_generate_export(tmp_path: Path):
    patch_dir = tmp_path / "patch"
    r = run("erase", "--method", "uce", "--concept", "star", "--preserve", "circle,heart", "--set", "lam=0.2",
            "-o", patch_dir)
    assert r.exit_code == 0, r.output
    manifest = json.loads((patch_dir / "patch.json").read_text())
    assert manifest["method"] == "uce" and manifest["config"]["lam"] == 0.2
    assert manifest["concepts"][0]["preserve"] == ["circle", "heart"]
    assert manifest["wall_time_s"] > 0 and manifest["residuals"]

    r = run("erase", "--concept", "star", "-o", patch_dir)
    assert r.exit_code != 0 and "already exists" in r.output

    grid = tmp_path / "g.png"
    r = run("generate", "a star", "-n", "1", "--steps", "2", "--patch", patch_dir, "-o", grid)
    assert r.exit_code == 0, r.output
    assert grid.is_file()

    out = tmp_path / "exported"
    r = run("export", "--patch", patch_dir, "-o", out)
    assert r.exit_code == 0, r.output
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False,
                                                     local_files_only=True)
    base = StableDiffusionPipeline.from_pretrained(str(model_path()), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    patch = load_patch(patch_dir)
    name, delta = next(iter(patch.deltas.items()))
    key = name.removeprefix("unet.")
    assert torch.allclose(merged.unet.state_dict()[key], base.unet.state_dict()[key] + delta, atol=1e-6)
    assert json.loads((out / "erasekit.json").read_text())["merged_patches"][0]["method"] == "uce"


def test_erase_bad_input_is_one_line(tmp_path: Path):
    for args, needle in [
        (("erase", "--concept", "  ", "-o", tmp_path / "a"), "empty"),
        (("erase", "--concept", "star", "--anchor", "star", "-o", tmp_path / "a"), "itself as anchor"),
        (("erase", "--concept", "star", "--preserve", "star", "-o", tmp_path / "a"), "both erased and preserved"),
        (("erase", "-o", tmp_path / "a"), "no concept"),
        (("erase", "--concept", "star", "--method", "zzz", "-o", tmp_path / "a"), "unknown method"),
        (("erase", "--concept", "star", "--set", "nope=1", "-o", tmp_path / "a"), "unknown setting"),
        (("erase", "--concept", "star", "-o", tmp_path / "missing" / "a"), "does not exist"),
        (("generate", "x", "--patch", tmp_path / "nopatch", "-o", tmp_path / "g.png"), "does not exist"),
    ]:
        r = run(*args)
        assert r.exit_code != 0, args
        assert r.output.startswith("error:") and "Traceback" not in r.output, r.output
        assert needle in r.output, (needle, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
