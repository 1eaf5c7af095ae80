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
    for name in ("uce", "rece", "speed", "mace", "realera", "negative-prompt"):
        assert name in r.output


def test_methods_and_attacks_show_edit_kinds_and_world_settings():
    """What `methods -v` / `attacks -v` promise in the README: each method's edit kind, and where the embedded
    world's settings differ from the paper's defaults, both values."""
    from erasekit.attacks import describe as describe_attacks
    from erasekit.methods import describe as describe_methods
    from erasekit.methods.esd import ESD_WORLD

    methods = {m["name"]: m for m in describe_methods()}
    assert methods["negative-prompt"]["edit_kind"] == "hook" and methods["esd"]["edit_kind"] == "weight_delta"
    steps = next(f for f in methods["esd"]["config"] if f["name"] == "steps")
    assert steps["default"] == 1000 and steps["world"] == ESD_WORLD["steps"]
    ti = next(a for a in describe_attacks() if a["name"] == "textual-inversion")
    assert next(f for f in ti["config"] if f["name"] == "steps")["world"] == 600
    r = runner.invoke(app, ["methods", "-v"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "hook" in r.output and f"steps=1000 (world: {ESD_WORLD['steps']})" in r.output
    r = runner.invoke(app, ["attacks", "-v"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "steps=3000 (world: 600)" in r.output


def test_erase_generate_export(tmp_path: Path):
    patch_dir = tmp_path / "patch"
    r = run("erase", "--method", "uce", "--concept", "star", "--preserve", "circle,heart", "--set", "lam=0.2",
            "-o", patch_dir)
    assert r.exit_code == 0, r.output
    manifest = json.loads((patch_dir / "edit.json").read_text())
    assert manifest["kind"] == "weight_delta" and manifest["format_version"] == 2
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
        (("erase", "--concept", "star", "--set", "lam=-1", "-o", tmp_path / "a"), "lam=-1.0 is out of range"),
        (("erase", "--concept", "star", "--set", "edit=q", "-o", tmp_path / "a"), "one of k, v, kv"),
        (("erase", "--concept", "star", "--set", "lora_rank=-2", "-o", tmp_path / "a"), "at least 0"),
        (("erase", "--concept", "star", "--method", "speed", "--set", "tau=0", "-o", tmp_path / "a"), "above 0"),
        (("erase", "--concept", "star", "--method", "rece", "--set", "uce_token=first", "-o", tmp_path / "a"),
         "one of last"),
        (("export", "--patch", tmp_path / "nopatch", "--format", "onnx", "-o", tmp_path / "x"), "choose diffusers"),
    ]:
        r = run(*args)
        assert r.exit_code != 0, args
        assert r.output.startswith("error:") and "Traceback" not in r.output, r.output
        assert needle in r.output, (needle, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lora_edit_through_the_cli_and_plain_diffusers(tmp_path: Path):
    """UCE as a rank-4 LoRA edit on the world model: erase -> generate -> export --format lora ->
    diffusers' own load_lora_weights gives the same UNet outputs as erasekit's merged edit."""
    from erasekit.adapters import get_adapter
    from erasekit.models import load_pipeline

    edit_dir = tmp_path / "lora"
    r = run("erase", "--method", "uce", "--concept", "star", "--preserve", "circle,heart", "--set", "lora_rank=4",
            "-o", edit_dir)
    assert r.exit_code == 0 and "lora edit" in r.output, r.output
    assert json.loads((edit_dir / "edit.json").read_text())["lora"]["r"] == 4
    r = run("generate", "a star", "-n", "1", "--steps", "2", "--patch", edit_dir, "-o", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    r = run("export", "--patch", edit_dir, "--format", "lora", "-o", tmp_path / "file")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "file" / "pytorch_lora_weights.safetensors").is_file()

    plain = StableDiffusionPipeline.from_pretrained(str(model_path()), safety_checker=None,
                                                    requires_safety_checker=False, local_files_only=True)
    plain.load_lora_weights(str(tmp_path / "file"))
    ours = load_pipeline(None, device="cpu")
    enc = get_adapter(ours).encode(["a red star on a grass background", "a blue circle"])
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad(), load_patch(edit_dir).scoped(ours):
        want = ours.unet(x, t, encoder_hidden_states=enc.embeds).sample
    with torch.no_grad():
        got = plain.unet(x, t, encoder_hidden_states=enc.embeds).sample
        base = ours.unet(x, t, encoder_hidden_states=enc.embeds).sample
    assert (got - want).abs().max() < 1e-4 * want.abs().max(), float((got - want).abs().max())
    assert (base - want).abs().max() > 1e-3  # and the edit does change the prediction


def test_hook_edit_through_the_cli(tmp_path: Path):
    edit_dir = tmp_path / "neg"
    r = run("erase", "--method", "negative-prompt", "--concept", "star", "-o", edit_dir)
    assert r.exit_code == 0 and "hook edit" in r.output, r.output
    r = run("generate", "a star", "-n", "1", "--steps", "2", "--patch", edit_dir, "-o", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    for fmt in ("diffusers", "lora"):
        r = run("export", "--patch", edit_dir, "--format", fmt, "-o", tmp_path / fmt)
        assert r.exit_code != 0 and r.output.startswith("error:") and "cannot be exported" in r.output, r.output
        assert "\n" not in r.output.strip() and not (tmp_path / fmt).exists()


def test_world_concepts_without_preserve_keep_the_other_values_of_their_axis():
    """What `erasekit erase` on the world fills in (and says) for concepts given without --preserve: the
    axis's other values, less every erased concept (and the world values its synonyms name) and anchor."""
    from erasekit.cli import _world_neighbours
    from erasekit.concepts import ConceptSpec
    from erasekit.world.vocab import CONCEPTS

    shapes = list(CONCEPTS["shape"])
    got, said = _world_neighbours([ConceptSpec("Star")])  # case does not matter
    assert got[0].neighbours == tuple(v for v in shapes if v != "star") and "other shapes for 'Star'" in said[0]
    got, _ = _world_neighbours([ConceptSpec("star", anchor="circle", synonyms=("moon",)), ConceptSpec("red")])
    assert got[0].neighbours == tuple(v for v in shapes if v not in ("star", "circle", "crescent"))
    assert "red" not in got[1].neighbours and len(got[1].neighbours) == len(CONCEPTS["colour"]) - 1
    given = [ConceptSpec("star", preserve=("a dog",)), ConceptSpec("Van Gogh")]  # the user's own; off the world
    assert _world_neighbours(given) == (given, [])
    every = [ConceptSpec(v) for v in CONCEPTS["texture"]]  # nothing left to keep: nothing is claimed
    assert _world_neighbours(every) == (every, [])
