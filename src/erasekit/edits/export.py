"""Export: weight and LoRA edits merged into a diffusers pipeline, or a LoRA edit as a diffusers
LoRA file that plain diffusers loads with ``pipe.load_lora_weights(folder)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import Edit, PatchError
from .lora import A_SUFFIX, B_SUFFIX, LoraEdit

LORA_FILE = "pytorch_lora_weights.safetensors"


def refuse_hooks(edits: list[Edit], what: str) -> None:
    for e in edits:
        if e.kind == "hook":
            raise PatchError(f"the {e.method} edit is a hook (it changes how the pipeline samples, not its weights) "
                             f"and cannot be exported as {what}; apply it at generation time with --patch instead")


def export_pipeline(pipe: Any, edits: Edit | list[Edit], out_dir: str | Path, overwrite: bool = False,
                    force: bool = False) -> Path:
    """Write a full diffusers pipeline with weight and LoRA ``edits`` merged; loadable by ``from_pretrained``."""
    from ..io import atomic_dir

    edits = [edits] if isinstance(edits, Edit) else list(edits)
    if not all(isinstance(e, Edit) for e in edits):
        raise PatchError("export takes edits (from erasekit.erase or erasekit.load_edit)")
    refuse_hooks(edits, "a pipeline")
    applied: list[Edit] = []
    try:
        for e in edits:
            applied.append(e.apply(pipe, force=force))
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            src = Path(getattr(pipe, "erasekit_source", "") or "")
            meta = json.loads((src / "erasekit.json").read_text()) if (src / "erasekit.json").is_file() else {}
            meta["merged_patches"] = [{"method": e.method, "kind": e.kind, "digest": e.digest, "concepts": e.concepts}
                                      for e in edits]
            meta.setdefault("sampling", {"num_inference_steps": 50, "guidance_scale": 7.5})
            (tmp / "erasekit.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        for e in reversed(applied):
            e.revert(pipe)
    return Path(out_dir)


def export_lora(pipe: Any, edit: Edit, out_dir: str | Path, overwrite: bool = False, force: bool = False) -> Path:
    """Write ``edit`` (a LoRA edit) as ``pytorch_lora_weights.safetensors`` in diffusers' own layout.

    The scale ``alpha / r`` is folded into the up matrices, so the file loads with diffusers'
    default ``lora_alpha = r`` and gives exactly the merged weights of ``edit``."""
    from ..io import atomic_dir

    if isinstance(edit, (list, tuple)) and len(edit) == 1:
        edit = edit[0]
    if not isinstance(edit, Edit):
        raise PatchError("export_lora takes one edit (from erasekit.erase or erasekit.load_edit)")
    refuse_hooks([edit], "a LoRA file")
    if not isinstance(edit, LoraEdit):
        raise PatchError(f"the {edit.method} edit is a {edit.kind}, not a LoRA; export it as a pipeline "
                         "(--format diffusers), or fit a LoRA: --set rank=R (fine-tuning methods) or --set lora_rank=R "
                         "(closed-form methods)")
    edit.check(pipe, force)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name in edit.down:
        comp, _, rest = name.partition(".")
        part = layers.setdefault(comp, {})
        part[rest + A_SUFFIX] = edit.down[name].float().contiguous()
        part[rest + B_SUFFIX] = (edit.up[name].float() * edit.scale).contiguous()
    unknown = set(layers) - {"unet", "text_encoder", "text_encoder_2"}
    if unknown:
        raise PatchError(f"diffusers LoRA files hold unet and text encoder layers, not {sorted(unknown)}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        kwargs = {f"{comp}_lora_layers": sd for comp, sd in layers.items()}
        type(pipe).save_lora_weights(str(tmp), weight_name=LORA_FILE, safe_serialization=True, **kwargs)
        (tmp / "erasekit.json").write_text(json.dumps({
            "lora_of": {"method": edit.method, "digest": edit.digest, "concepts": edit.concepts,
                        "base_fingerprint": edit.manifest.get("base_fingerprint"), "rank": edit.rank}}, indent=2) + "\n")
    return Path(out_dir)
