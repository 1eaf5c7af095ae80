"""Stable Diffusion XL: two text encoders, concatenated hidden states, pooled ``add_embeds``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Encoded
from .sd import SDAdapter, token_embeddings_as


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

    def _text_pairs(self) -> list[tuple[Any, torch.nn.Module]]:
        if self.pipe.tokenizer is None:
            return [(self.pipe.tokenizer_2, self.pipe.text_encoder_2)]
        return [(self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)]

    def _encode_from(self, embeds: list[torch.Tensor], ids: list[torch.Tensor], lengths: torch.Tensor) -> Encoded:
        hidden, pooled = [], None
        for (_, te), e, i in zip(self._text_pairs(), embeds, ids):
            with token_embeddings_as(te, e):
                out = te(i.to(te.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # text_embeds of the first encoder with a projection
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        dtype = (self.pipe.unet if self.pipe.text_encoder_2 is None else self.pipe.text_encoder_2).dtype
        return Encoded(torch.cat(hidden, dim=-1).to(dtype=dtype, device=self.device), lengths, pooled)

    def uncond(self, n: int) -> Encoded:
        """Zeros (pooled too) when the pipeline's ``force_zeros_for_empty_prompt`` is set, else the encoding of ""."""
        if not self.pipe.config.force_zeros_for_empty_prompt:
            return super().uncond(n)
        e = self.encode([""])
        return Encoded(torch.zeros_like(e.embeds).repeat(n, 1, 1), e.lengths.repeat(n),
                       torch.zeros_like(e.pooled).repeat(n, 1))

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        timesteps = super().set_timesteps(num_inference_steps)
        if hasattr(self.pipe.scheduler, "set_begin_index"):
            self.pipe.scheduler.set_begin_index(0)
        return timesteps

    def _added_cond(self, cond: Encoded) -> dict[str, torch.Tensor] | None:
        """SDXL's micro-conditioning for default arguments: original = target = image size, crop (0, 0)."""
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.embeds.dtype).to(self.device)
        return {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(len(cond), 1)}

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.pipe.vae.config
        if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
            return None
        return tuple(torch.tensor(v).view(1, 4, 1, 1).to(like.device, like.dtype)  # type: ignore[return-value]
                     for v in (cfg.latents_mean, cfg.latents_std))

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(z)
        if stats is None:
            return super()._scale_latents(z)
        return (z - stats[0]) * self.pipe.vae.config.scaling_factor / stats[1]

    def decode_latents(self, latents: torch.Tensor,
                       generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """As the SDXL pipeline decodes: a float16 VAE with ``force_upcast`` decodes in float32, and
        ``latents_mean``/``latents_std`` are undone where the VAE config has them."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        try:
            stats = self._latent_stats(latents)
            sf = vae.config.scaling_factor
            latents = latents / sf if stats is None else latents * stats[1] / sf + stats[0]
            return vae.decode(latents.to(vae.device), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)

    def postprocess(self, images: torch.Tensor, output_type: str) -> Any:
        if getattr(self.pipe, "watermark", None) is not None:
            images = self.pipe.watermark.apply_watermark(images)
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
