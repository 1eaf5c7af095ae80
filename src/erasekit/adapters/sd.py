"""Stable Diffusion 1.x / 2.x (one CLIP text encoder), and the embedded world model."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from ..concepts import check_text
from ..errors import InvalidInputError
from . import sampling
from .base import Encoded, check_role, config_digest, weights_digest
from .sampling import Hook, Images

FINGERPRINT_ATTR = "_erasekit_base_fingerprint"


class SDAdapter:
    """Adapter for ``StableDiffusionPipeline``-shaped pipelines (one text encoder)."""

    family: ClassVar[str] = "sd"
    _unet_fn: Any = None  # set by unet_calls(): what predict_noise calls instead of the pipeline's UNet

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @contextlib.contextmanager
    def unet_calls(self, fn: Any) -> Iterator[None]:
        """Inside the block, :meth:`predict_noise` calls ``fn`` (the same UNet behind ``torch.compile``, say)
        with the UNet's arguments instead of the pipeline's UNet; ``None`` changes nothing."""
        prev = self._unet_fn
        self._unet_fn = fn if fn is not None else prev
        try:
            yield
        finally:
            self._unet_fn = prev

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon", "v_prediction" or "sample" (the scheduler's config)."""
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the pipeline generates when none is given."""
        size = self.pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor

    def modules(self, role: str) -> dict[str, torch.nn.Module]:
        """Modules serving ``role`` by full name (``unet.down_blocks...attn2.to_k``); see ``ROLES``."""
        check_role(role)
        if role == "text_encoder":
            return {f"{comp}.{n}": m for comp, te in self.text_encoder_components().items()
                    for n, m in te.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        out: dict[str, torch.nn.Module] = {}
        for n, m in self.pipe.unet.named_modules():
            cross = ".attn2." in f".{n}."
            kv = {"cross_attn_kv": ("to_k", "to_v"), "cross_attn_k": ("to_k",), "cross_attn_v": ("to_v",)}.get(role)
            if kv and cross and n.endswith(kv) and isinstance(m, torch.nn.Linear):
                out[f"unet.{n}"] = m
            elif role == "cross_attn" and cross and isinstance(m, torch.nn.Linear):
                out[f"unet.{n}"] = m
            elif role == "unet_no_cross_attn" and not cross and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                out[f"unet.{n}"] = m
        return out

    def sites(self) -> dict[str, str]:
        """Activation sites by role name -> full module name.

        ``unet-up-attn-S-A`` is transformer A of the S-th UNet up block that has transformers, counted in
        the order the UNet runs them (so S = 0 is the lowest-resolution one); ``unet-down-attn-S-A`` the
        same for down blocks; ``unet-mid`` the middle block's transformer; ``text-encoder-layer-N`` the
        residual output of layer N of the first text encoder (``text-encoder-2-layer-N`` of the second).
        SAeUron's object site on SD1.x, ``up_blocks.1.attentions.1`` (SD1.x's up block 0 has no
        transformer), is ``unet-up-attn-0-1``; on the world model the same role is
        ``up_blocks.0.attentions.1``: both are the first cross-attention up block, at a quarter of the
        latent resolution (16x16 of 64x64; 4x4 of 16x16)."""
        out: dict[str, str] = {}
        unet = self.pipe.unet
        for kind in ("down", "up"):
            stage = 0
            for b, block in enumerate(getattr(unet, f"{kind}_blocks", [])):
                attentions = getattr(block, "attentions", None) or []
                for a in range(len(attentions)):
                    out[f"unet-{kind}-attn-{stage}-{a}"] = f"unet.{kind}_blocks.{b}.attentions.{a}"
                stage += bool(attentions)
        if getattr(getattr(unet, "mid_block", None), "attentions", None):
            out["unet-mid"] = "unet.mid_block.attentions.0"
        for i, (comp, te) in enumerate(self.text_encoder_components().items()):
            role = "text-encoder" if i == 0 else f"text-encoder-{i + 1}"
            for path in ("text_model.encoder.layers", "encoder.layers"):  # transformers 4 / 5 CLIP layouts
                try:
                    layers = te.get_submodule(path)
                except AttributeError:
                    continue
                out.update({f"{role}-layer-{n}": f"{comp}.{path}.{n}" for n in range(len(layers))})
                break
        return out

    def site(self, name: str) -> str:
        """The full module name of the site ``name`` (a role name from :meth:`sites`, or a full module name
        such as ``unet.up_blocks.1.attentions.1``); one line naming the available roles otherwise."""
        from .sampling import resolve_module

        sites = self.sites()
        if name in sites:
            return sites[name]
        if "." in name:
            resolve_module(self.pipe, name)
            return name
        groups: dict[str, list[str]] = {}
        for role in sites:
            groups.setdefault(role.rsplit("-", 1)[0] if role[-1].isdigit() else role, []).append(role)
        have = ", ".join(f"{v[0]}..{v[-1].rsplit('-', 1)[-1]}" if len(v) > 1 else v[0] for v in groups.values())
        raise InvalidInputError(f"unknown site {name!r}; this model has {have}, or name a module as "
                                "'component.path' (e.g. unet.up_blocks.0.attentions.1)")

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
    def encode(self, prompts: list[str], unique: bool = True) -> Encoded:
        """Encode prompts as the pipeline does; repeated prompts (e.g. the anchor "") are encoded once
        unless ``unique`` is False (then the batch goes through as the pipeline's own call sends it, which
        gives its numbers bit for bit: a batch's shape can change the last float bit). A prompt longer
        than the text encoder's context is refused: the pipeline would silently cut it."""
        self.check_length(prompts)
        if not unique:
            embeds, pooled = self._encode_unique(prompts)
            return Encoded(embeds, self._lengths(prompts), pooled)
        distinct = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(distinct)}
        idx = torch.tensor([where[p] for p in prompts], dtype=torch.long)
        embeds, pooled = self._encode_unique(distinct)
        return Encoded(embeds[idx.to(embeds.device)], self._lengths(prompts),
                       None if pooled is None else pooled[idx.to(pooled.device)])

    def check_length(self, prompts: list[str]) -> None:
        """One-line error for a prompt that is not text or does not fit the text encoder's context."""
        for p in prompts:
            check_text(p, "a prompt")
        for tok, _ in self._text_pairs():
            limit = tok.model_max_length
            over = tok(list(prompts), truncation=True, max_length=limit + 1).input_ids  # no "too long" warning
            for p, ids in zip(prompts, over):
                if len(ids) > limit:
                    raise InvalidInputError(f"{p[:60]!r}{'...' if len(p) > 60 else ''} is longer than the {limit} "
                                            "tokens the text encoder reads; shorten it")

    # ------------------------------------------------------------------ text conditioning
    def _text_pairs(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs in the order ``encode_prompt`` runs them."""
        return [(self.pipe.tokenizer, self.pipe.text_encoder)]

    def input_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per text encoder, the (N, L) padded token ids the pipeline feeds it for ``prompts``."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)  # textual-inversion multi-vector tokens
        return [tok(convert(prompts, tok) if convert else prompts, padding="max_length",
                    max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(te.device)
                for tok, te in self._text_pairs()]

    def token_embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per text encoder, the (N, L, d_tok) input token embeddings of ``prompts`` (no position embeddings)."""
        return [te.get_input_embeddings()(ids) for ids, (_, te) in zip(self.input_ids(prompts), self._text_pairs())]

    def encode_embeddings(self, token_embeds: torch.Tensor | list[torch.Tensor],
                          input_ids: torch.Tensor | list[torch.Tensor]) -> Encoded:
        """Encode from token embeddings (one tensor per text encoder) instead of ids, as ``encode`` would
        encode the prompts of ``input_ids``; differentiable in ``token_embeds``. The ids give the lengths
        and the pooling (end-token) position."""
        embeds = [token_embeds] if isinstance(token_embeds, torch.Tensor) else list(token_embeds)
        ids = [input_ids] if isinstance(input_ids, torch.Tensor) else list(input_ids)
        eos = self._text_pairs()[0][0].eos_token_id
        lengths = (ids[0].cpu() == eos).int().argmax(-1) + 1
        out = self._encode_from(embeds, ids, lengths)
        out.inputs = list(zip(embeds, ids))
        return out

    def _encode_from(self, embeds: list[torch.Tensor], ids: list[torch.Tensor], lengths: torch.Tensor) -> Encoded:
        te = self.pipe.text_encoder
        mask = None
        if getattr(te.config, "use_attention_mask", False):
            mask = (torch.arange(ids[0].shape[-1]) < lengths[:, None]).long().to(te.device)
        with token_embeddings_as(te, embeds[0]):
            out = te(ids[0].to(te.device), attention_mask=mask)[0]
        return Encoded(out.to(dtype=te.dtype, device=self.device), lengths)

    def uncond(self, n: int) -> Encoded:
        """The conditioning the pipeline guides away from when no negative prompt is given, for ``n`` images."""
        return self.encode([""] * n, unique=False)

    # ------------------------------------------------------------------ denoising
    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Set the scheduler up for sampling as the pipeline does; the timesteps, on the adapter device."""
        self.pipe.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Encoded, uncond: Encoded | None = None,
                      guidance: float = 1.0) -> torch.Tensor:
        """The UNet's raw output (what ``prediction_type`` names) for the model input ``latents`` at ``t``
        (a timestep or one per row), with classifier-free guidance when ``uncond`` is given (one UNet call
        on [uncond, cond], as the pipeline does).

        ``latents`` is the model input: ``scheduler.scale_model_input`` is NOT applied here (the sampling
        loop applies it; it is the identity for DDIM/DDPM, so ``add_noise`` output can go in as is).
        ``guidance`` also feeds the guidance embedding of UNets with ``time_cond_proj_dim``.
        """
        both = cond if uncond is None else Encoded.cat([uncond, cond])
        x = latents if uncond is None else torch.cat([latents] * 2)
        if uncond is not None and isinstance(t, torch.Tensor) and t.ndim == 1:
            t = torch.cat([t] * 2)  # one timestep per row: the same for both halves
        unet = self.pipe.unet if self._unet_fn is None else self._unet_fn
        out = unet(x, t, encoder_hidden_states=both.embeds,
                   timestep_cond=self._timestep_cond(guidance, len(x), x.dtype),
                   added_cond_kwargs=self._added_cond(both), return_dict=False)[0]
        if uncond is None:
            return out
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def _added_cond(self, cond: Encoded) -> dict[str, torch.Tensor] | None:
        return None

    def _timestep_cond(self, guidance: float, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        dim = self.pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(guidance - 1).repeat(n)
        return self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=self.device, dtype=dtype)

    @functools.cached_property
    def _train_scheduler(self) -> Any:
        from diffusers import DDPMScheduler  # diffusers loads at first use: `import erasekit` stays fast

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise for integer training timesteps ``t``: the
        scheduler's training schedule (as DDPMScheduler.add_noise), the model input ``predict_noise`` takes."""
        return self._train_scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict for ``add_noise(x0, noise, t)`` (noise, velocity or x0)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self._train_scheduler.get_velocity(x0, noise, t.to(x0.device))

    # ------------------------------------------------------------------ images and latents
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of (N, 3, H, W) images in [-1, 1]: the VAE posterior's mean, or a sample drawn with
        ``generator`` when one is given, scaled as the UNet sees latents."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self._scale_latents(dist.mean if generator is None else dist.sample(generator))

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.pipe.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor,
                       generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] of UNet-space latents, decoded as the pipeline decodes."""
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]

    def postprocess(self, images: torch.Tensor, output_type: str) -> Any:
        """Decoded images in [-1, 1] as the pipeline returns them for ``output_type`` ("np", "pt", "pil"),
        through its safety checker where it has one."""
        images, nsfw = self.pipe.run_safety_checker(images, self.device, self.pipe.text_encoder.dtype)
        denormalize = None if nsfw is None else [not x for x in nsfw]
        return self.pipe.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)

    def sample(self, prompts: list[str] | Encoded, generators: list[torch.Generator], num_inference_steps: int,
               guidance_scale: float, uncond: Encoded | None = None, hooks: Sequence[Hook] = (),
               output_type: str = "np", return_latents: bool = False,
               grad: bool = False) -> Images | tuple[Images, torch.Tensor]:
        """Generate one image per prompt (or ``Encoded`` row) with erasekit's sampling loop; see
        :func:`erasekit.adapters.sampling.sample`."""
        return sampling.sample(self, prompts, generators, num_inference_steps, guidance_scale, uncond=uncond,
                               hooks=hooks, output_type=output_type, return_latents=return_latents, grad=grad)

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


@contextlib.contextmanager
def token_embeddings_as(te: torch.nn.Module, embeds: torch.Tensor) -> Iterator[None]:
    """Within the block, ``te``'s token-embedding layer outputs ``embeds`` (same shape as the ids it is
    given) instead of looking the ids up; everything after it (position embeddings, mask, layers,
    pooling) runs as the encoder's own forward does, in any transformers version."""
    def replace(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if embeds.shape != out.shape:
            raise InvalidInputError(f"token embeddings of shape {tuple(embeds.shape)} do not fit input ids that embed "
                                    f"to {tuple(out.shape)}; pass one (N, L, d) tensor per text encoder")
        return embeds.to(device=out.device, dtype=out.dtype)

    handle = te.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
