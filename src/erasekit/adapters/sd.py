"""Stable Diffusion 1.x / 2.x (one CLIP text encoder), and the embedded world model."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch

from .base import Encoded, check_role, config_digest, weights_digest

FINGERPRINT_ATTR = "_erasekit_base_fingerprint"


class SDAdapter:
    """Adapter for ``StableDiffusionPipeline``-shaped pipelines (one text encoder)."""

    family: ClassVar[str] = "sd"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def modules(self, role: str) -> dict[str, torch.nn.Module]:
        """Modules serving ``role`` by full name (``unet.down_blocks...attn2.to_k``); see ``ROLES``."""
        check_role(role)
        if role == "text_encoder":
            return {f"{comp}.{n}": m for comp, te in self.text_encoder_components().items()
                    for n, m in te.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        out: dict[str, torch.nn.Module] = {}
        for n, m in self.pipe.unet.named_modules():
            cross = ".attn2." in f".{n}."
            if role == "cross_attn_kv" and cross and n.endswith(("to_k", "to_v")) and isinstance(m, torch.nn.Linear):
                out[f"unet.{n}"] = m
            elif role == "cross_attn" and cross and isinstance(m, torch.nn.Linear):
                out[f"unet.{n}"] = m
            elif role == "unet_no_cross_attn" and not cross and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                out[f"unet.{n}"] = m
        return out

    def kv_modules(self) -> dict[str, torch.nn.Linear]:
        """Cross-attention K/V projections by UNet-relative name (kept for callers of 0.1)."""
        return {n.removeprefix("unet."): m for n, m in self.modules("cross_attn_kv").items()}  # type: ignore[misc]

    def text_encoder_components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name."""
        return {"text_encoder": self.pipe.text_encoder}

    def text_encoders(self) -> list[torch.nn.Module]:
        return list(self.text_encoder_components().values())

    def _lengths(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_attention_mask=True, return_tensors="pt")
        return enc.attention_mask.sum(-1)

    def _encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = []
        for i in range(0, len(prompts), 256):
            e, _ = self.pipe.encode_prompt(prompts[i:i + 256], self.device, 1, False)
            embeds.append(e)
        return torch.cat(embeds), None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Encoded:
        """Encode prompts as the pipeline does; repeated prompts (e.g. the anchor "") are encoded once."""
        unique = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(unique)}
        idx = torch.tensor([where[p] for p in prompts], dtype=torch.long)
        embeds, pooled = self._encode_unique(unique)
        return Encoded(embeds[idx.to(embeds.device)], self._lengths(prompts),
                       None if pooled is None else pooled[idx.to(pooled.device)])

    def fingerprint(self) -> str:
        """Hash of the unedited base model; cached on the pipeline before the first patch."""
        cached = getattr(self.pipe, FINGERPRINT_ATTR, None)
        if cached:
            return cached
        h = hashlib.sha256(self.family.encode())
        config_digest(h, self.pipe.unet.config, *(te.config.to_dict() for te in self.text_encoders()))
        mods = self.kv_modules()
        weights_digest(h, [mods[n].weight for n in sorted(mods)])
        for te in self.text_encoders():
            emb = te.get_input_embeddings().weight
            weights_digest(h, [emb[: min(2048, len(emb))]])
        return h.hexdigest()[:16]
