"""The edit folder format across versions, the family registry, and the image cache key."""

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline
from safetensors.torch import save_file

import erasekit
from erasekit.edits import KINDS, PatchError, WeightDelta, load_edit
from erasekit.errors import InvalidInputError
from erasekit.evaluation import ImageCache
from erasekit.evaluation.cache import state_key
from erasekit.evaluation.evaluate import generate_cached
from erasekit.evaluation.prompts import PromptSet
from tiny import tiny_sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"))


def write_format_1(edit: WeightDelta, folder):
    """A patch folder exactly as erasekit 0.1 wrote it (patch.json + patch.safetensors)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in edit.deltas.items()}, str(folder / "patch.safetensors"),
              metadata={"format": "pt", "erasekit": "weight_delta"})
    m = {k: v for k, v in edit.manifest.items()}
    m.update(format_version=1, kind="weight_delta", tensors={k: list(v.shape) for k, v in edit.deltas.items()},
             tensors_sha256=hashlib.sha256((folder / "patch.safetensors").read_bytes()).hexdigest())
    m["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":"),
                                                     default=str).encode()).hexdigest()
    (folder / "patch.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def old_digest(deltas):
    h = hashlib.sha256()
    for k in sorted(deltas):
        h.update(k.encode())
        h.update(deltas[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_format_1_patch_folders_keep_loading_and_applying(sd, tmp_path):
    edit = erasekit.erase(sd, "star", method="uce")
    write_format_1(edit, tmp_path / "old")
    old = load_edit(tmp_path / "old")
    assert isinstance(old, WeightDelta) and old.digest == edit.digest == old_digest(edit.deltas)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with old.scoped(sd):
        assert not torch.equal(sd.unet.state_dict()[next(iter(edit.deltas)).removeprefix("unet.")],
                               before[next(iter(edit.deltas)).removeprefix("unet.")])
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    # re-saved, it is a format-2 folder with the same content
    old.save(tmp_path / "new")
    m = json.loads((tmp_path / "new" / "edit.json").read_text())
    assert m["format_version"] == 2 and m["kind"] == "weight_delta" and "edit.safetensors" in m["files"]
    assert load_edit(tmp_path / "new").digest == edit.digest
    # a format-1 folder whose tensors were cut is refused like a format-2 one
    data = (tmp_path / "old" / "patch.safetensors").read_bytes()
    (tmp_path / "old" / "patch.safetensors").write_bytes(data[:100])
    with pytest.raises(PatchError, match="truncated"):
        load_edit(tmp_path / "old")


def test_edit_folder_errors_are_one_line(sd, tmp_path):
    edit = erasekit.erase(sd, "star", method="negative-prompt")
    edit.save(tmp_path / "e")
    m = json.loads((tmp_path / "e" / "edit.json").read_text())
    m["kind"] = "quantum"
    m.pop("manifest_sha256")
    m["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "e" / "edit.json").write_text(json.dumps(m))
    with pytest.raises(PatchError, match="'quantum'.*upgrade erasekit"):
        load_edit(tmp_path / "e")
    (tmp_path / "f.png").write_bytes(b"\x89PNG")
    with pytest.raises(PatchError, match="is a file, not an edit folder"):
        load_edit(tmp_path / "f.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchError, match="edit.json is missing"):
        load_edit(tmp_path / "empty")
    assert set(KINDS) == {"weight_delta", "lora", "hook"}


def test_unclaimed_pipelines_get_one_line_naming_the_families(sd):
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    pix2pix = StableDiffusionInstructPix2PixPipeline(**sd.components)
    for pipe in (img2img, pix2pix, object()):
        for method in ("uce", "negative-prompt", "sld", "safree"):  # weights and guards alike
            with pytest.raises(InvalidInputError, match="not a supported pipeline; erasekit serves SDXL, Stable "
                                                        "Diffusion"):
                erasekit.erase(pipe, "star", method=method)


def test_negative_prompt_refuses_a_prompt_longer_than_the_context(sd):
    long = [f"concept{i}" for i in range(40)]
    with pytest.raises(InvalidInputError, match="negative prompt .* is longer than the text encoder reads"):
        erasekit.erase(sd, long, method="negative-prompt")


def test_cache_key_covers_every_weight_generation_reads_and_hook_edits(sd, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    ps = PromptSet("t", ("a star", "a red circle"), ({}, {}))
    samp = {"num_inference_steps": 2, "guidance_scale": 5.0}

    def gen():
        return generate_cached(sd, ps, [0, 1], samp, cache, state_key(sd))

    base = gen()
    assert (cache.hits, cache.misses) == (0, 2)
    assert np.array_equal(gen(), base) and cache.hits == 2
    # a "fine-tuned" UNet with the base's K/V (conv_in changed) must not meet the base's images
    conv = sd.unet.conv_in.weight
    saved = conv.detach().clone()
    with torch.no_grad():
        conv.mul_(1.01)
    try:
        assert not np.array_equal(gen(), base) and cache.misses == 4
    finally:
        with torch.no_grad():
            conv.copy_(saved)
    assert np.array_equal(gen(), base) and cache.hits == 4
    # so must a hook edit on the stack, and a VAE change
    with erasekit.erase(sd, "star", method="negative-prompt").scoped(sd):
        gen()
    assert cache.misses == 6
    with torch.no_grad():
        sd.vae.decoder.conv_out.bias.add_(0.1)
    try:
        gen()
        assert cache.misses == 8
    finally:
        with torch.no_grad():
            sd.vae.decoder.conv_out.bias.sub_(0.1)


def test_hook_edits_of_different_concepts_differ_and_format_1_token_all_is_renamed(sd, tmp_path):
    a = erasekit.erase(sd, "star", method="negative-prompt")
    b = erasekit.erase(sd, "circle", method="negative-prompt")
    assert a.digest != b.digest  # their image-cache keys differ too
    uce = erasekit.erase(sd, "star", method="uce", token="from_last")
    old = WeightDelta(uce.deltas, {**uce.manifest, "config": {**uce.manifest["config"], "token": "all"}})
    write_format_1(old, tmp_path / "old")
    loaded = load_edit(tmp_path / "old")
    assert loaded.manifest["config"]["token"] == "from_last" and loaded.manifest["migrated_from_format"] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"templates": ()}, "templates is empty"),
    ({"templates": ("a photo",)}, "has no {} where the phrase goes"),
    ({"lam": float("nan")}, "lam is NaN"),
    ({"lam": -1.0}, "out of range: it must be at least 0.0"),
    ({"lam": "x"}, "should be float, not str"),
    ({"lora_rank": 1.5}, "should be int, not float"),
    ({"edit": "q"}, "one of k, v, kv"),
])
def test_settings_are_checked_in_one_line(sd, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        erasekit.erase(sd, "star", method="uce", **kwargs)


def test_public_api_type_errors_are_one_line(sd, tmp_path):
    edit = erasekit.erase(sd, "star", method="uce")
    with pytest.raises(PatchError, match="is a path"):
        load_edit(None)
    with pytest.raises(erasekit.ErasekitError, match="not int"):
        erasekit.evaluate(sd, "star", patch=3, seeds=[0])
    with pytest.raises(PatchError, match="not a LoRA"):
        erasekit.export_lora(sd, [edit], tmp_path / "x")
    erasekit.export_pipeline(sd, edit, tmp_path / "y")  # one edit, not in a list, is fine
    assert (tmp_path / "y" / "model_index.json").is_file()
