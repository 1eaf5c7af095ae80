"""Stable Diffusion XL: two text encoders, concatenated hidden states, pooled ``add_embeds``."""

from __future__ import annotations

from typing import ClassVar

import torch

from .sd import SDAdapter


class SDXLAdapter(SDAdapter):
    """Adapter for ``StableDiffusionXLPipeline``; cross-attention reads the concatenation of
    both encoders' penultimate hidden states (d = 768 + 1280 for SDXL-base)."""

    family: ClassVar[str] = "sdxl"

    def text_encoder_components(self) -> dict[str, torch.nn.Module]:
        return {n: te for n in ("text_encoder", "text_encoder_2")
                if (te := getattr(self.pipe, n, None)) is not None}

    def _lengths(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer_2 if self.pipe.tokenizer is None else self.pipe.tokenizer
        enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_attention_mask=True, return_tensors="pt")
        return enc.attention_mask.sum(-1)

    def _encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], []
        for i in range(0, len(prompts), 256):
            e, _, p, _ = self.pipe.encode_prompt(prompts[i:i + 256], device=self.device,
                                                 num_images_per_prompt=1, do_classifier_free_guidance=False)
            embeds.append(e)
            pooled.append(p)
        return torch.cat(embeds), torch.cat(pooled)
