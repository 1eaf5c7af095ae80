"""SalUn (Fan et al. 2024, saliency unlearning): train only the weights that matter most for the
concept, found by a gradient saliency map.

1. Saliency: over ``n_images`` images of the concept the model draws itself (the forget set), the
   gradient of the guided denoising loss ``‖target(x0, ε, t) − [(1+w) θ(x_t, c_f) − w θ(x_t, ∅)]‖²``
   (w = ``saliency_guidance``, 7.5) is accumulated; the mask keeps the ``mask_ratio`` (0.5) fraction
   of the selected weights with the *largest* |g|, one global threshold. An earlier official SD
   script ranked ascending and kept the smallest half; the current one keeps the largest, as here
   (``mask_stats`` in the manifest records the threshold and what was kept).
2. Unlearning: ``‖θ(x_t, c_f) − sg[θ(x_t, c_pseudo)]‖² + α ‖θ(x^r_t, c_r) − target‖²``: the concept's
   prediction is sent to the pseudo prompt's (the concept's anchor, "" = the unconditional prompt),
   on the same image and noise, while retain images (generated from the concept's preserve and
   neighbour prompts, else its anchor, else the empty prompt) keep their denoising loss. The
   pseudo target comes from the current model under no_grad, as in the official code. Gradients are
   multiplied by the mask before every step, so weights outside it never move (Adam's update of a
   zero gradient from zero state is exactly zero) and the edit is a weight delta that is zero there.

Defaults: the official NSFW setting (α 0.1, Adam lr 1e-5, batch 8, one epoch: ``steps`` = n_images /
batch = 100 over 800 images there; here 100 steps over 200 images), ``params=unet`` (``full``), or
``x`` (``xattn``). Targets live in the model's prediction space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..concepts import ConceptSpec
from ..errors import InvalidInputError
from ..training import Trainable, TrainingConfig, step_generator
from .closed_form import expand
from .finetune import FineTuneMethod, generate_latents, noisy, repeat_encoded, select_params, template_pairs


@dataclass(frozen=True)
class SalUnConfig(TrainingConfig):
    """SalUn's settings (official NSFW defaults)."""

    steps: int = field(default=100, metadata={"help": "optimisation steps", "min": 1})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate", "above": 0.0})
    batch_size: int = field(default=8, metadata={"help": "forget (and retain) images per step", "min": 1})
    alpha: float = field(default=0.1, metadata={"help": "weight of the retain denoising loss", "min": 0.0})
    mask_ratio: float = field(default=0.5, metadata={
        "help": "fraction of the selected weights the saliency mask keeps (the largest |gradient|; 1 = no mask)",
        "above": 0.0, "max": 1.0})
    saliency_guidance: float = field(default=7.5, metadata={"help": "w of the guided saliency loss", "min": 0.0})
    params: str = field(default="unet", metadata={"help": "unet: every UNet layer (full); x: cross-attention "
                                                  "(xattn)", "choices": ("unet", "x")})
    n_images: int = field(default=200, metadata={"help": "forget images (and as many retain images) the model "
                                                 "generates", "min": 1})
    templates: tuple[str, ...] = field(default=("{}",), metadata={
        "help": "prompt templates ({} = the concept, its anchor, the retain phrases)", "min_items": 1,
        "each_contains": "{}"})


def saliency_mask(grads: dict[str, torch.Tensor], ratio: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Keep the ``ratio`` fraction of all entries with the largest |g| (one global threshold); the masks
    (bool) and what they kept."""
    flat = torch.cat([g.abs().flatten().float() for g in grads.values()])
    n_keep = max(1, round(ratio * flat.numel()))
    if n_keep >= flat.numel():
        thr = float("-inf")
    else:
        thr = float(torch.kthvalue(flat.cpu(), flat.numel() - n_keep).values)  # keep strictly above the kth smallest
    masks = {n: g.abs().float() > thr for n, g in grads.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    return masks, {"threshold": thr, "kept": kept, "total": int(flat.numel()), "kept_fraction": kept / flat.numel()}


#: SalUn on the embedded world (CPU-sized: 32 forget and 32 retain images; chosen on star, 16 + 18
#: training-template images with 8 erase templates: star 1.00 -> 0.00, other shapes 1.00 -> 0.91; lr 5e-5
#: gave 0.25 / 0.93). ``erasekit erase`` on the world uses these unless --set overrides them.
#: Re-chosen on the shipped broad-grammar model by the rule of ``UCE_WORLD`` (highest mean templated H over
#: star, heart and circle, seeds 100-115; ``world_erasure.py`` on a CPU): lr 1e-4 / 5e-5 / 2e-4 gave H
#: 0.896 / 0.378 / 0.918 (paraphrases 0.892 / 0.412 / 0.920), so 2e-4; 4e-4, tried after because 2e-4 was
#: the grid's edge, gave 0.870. At 2e-4 the other shapes keep only 0.77 on these seeds (0.69 on
#: paraphrases; star on the README table's seeds 0.84).
SALUN_WORLD: dict[str, object] = {"steps": 40, "lr": 2e-4, "batch_size": 4, "n_images": 32}


class SalUn(FineTuneMethod):
    name = "salun"
    description = "SalUn: a gradient-saliency mask, then the concept sent to a pseudo prompt with a retain loss"
    Config = SalUnConfig

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        return {**super().world_settings(concepts), **SALUN_WORLD}

    def check(self, concepts: list[ConceptSpec]) -> None:
        if self.config.rank:
            raise InvalidInputError("SalUn masks individual weights; LoRA does not apply (use rank=0)")

    def trained_params(self, adapter: Any) -> list[str]:
        return select_params(adapter, self.config.params)

    def prepare(self, adapter: Any, concepts: list[ConceptSpec], trainable: Trainable) -> dict[str, Any]:
        cfg: SalUnConfig = self.config
        pairs = template_pairs(concepts, cfg.templates)
        retain = [p for c in concepts for k in c.keep_phrases for p in expand(cfg.templates, k)]
        if not retain:
            retain = list(dict.fromkeys(a for _, a in pairs))  # the anchors ("" when none)
        adapter.check_length([p for pair in pairs for p in pair] + retain)
        forget_i = [i % len(pairs) for i in range(cfg.n_images)]
        retain_p = [retain[i % len(retain)] for i in range(cfg.n_images)]
        with trainable.frozen():
            x_f = generate_latents(adapter, [pairs[i][0] for i in forget_i], cfg.seed, "salun-forget")
            x_r = generate_latents(adapter, retain_p, cfg.seed, "salun-retain")
            enc_f = adapter.encode([pairs[i][0] for i in forget_i], unique=False)
            enc_p = adapter.encode([pairs[i][1] for i in forget_i], unique=False)
            enc_r = adapter.encode(retain_p, unique=False)
            uncond = adapter.uncond(1)
        masks, stats = self._saliency(adapter, trainable, x_f, enc_f, uncond)
        return {"x_f": x_f, "x_r": x_r, "enc_f": enc_f, "enc_p": enc_p, "enc_r": enc_r, "masks": masks,
                "mask_stats": stats}

    def _saliency(self, adapter: Any, trainable: Trainable, x_f: torch.Tensor, enc_f: Any,
                  uncond: Any) -> tuple[list[torch.Tensor], dict[str, float]]:
        """One pass over the forget set accumulating the guided loss's gradients, then the mask."""
        cfg: SalUnConfig = self.config
        params = trainable.parameters()
        for p in params:
            p.grad = None
        w = cfg.saliency_guidance
        for start in range(0, len(x_f), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            x0 = x_f[sl]
            x_t, t, target = noisy(adapter, x0, step_generator(cfg.seed, "salun-saliency", start))
            out = adapter.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                        type(enc_f).cat([repeat_encoded(uncond, len(x0)), enc_f.index(
                                            list(range(start, start + len(x0))))]))
            u, c = out.chunk(2)
            loss = torch.nn.functional.mse_loss(target.float(), ((1 + w) * c - w * u).float())
            loss.backward()
        grads = {str(i): (p.grad if p.grad is not None else torch.zeros_like(p)) for i, p in enumerate(params)}
        masks, stats = saliency_mask(grads, cfg.mask_ratio)
        for p in params:
            p.grad = None
        return [masks[str(i)] for i in range(len(params))], stats

    def loss(self, adapter: Any, state: dict[str, Any], trainable: Trainable, step: int) -> torch.Tensor:
        cfg: SalUnConfig = self.config
        g = step_generator(cfg.seed, "salun", step)
        n = len(state["x_f"])
        idx = torch.randint(n, (cfg.batch_size,), generator=g).tolist()
        ridx = torch.randint(len(state["x_r"]), (cfg.batch_size,), generator=g).tolist()
        x_t, t, _ = noisy(adapter, state["x_f"][idx], g)
        with torch.no_grad():
            pseudo = adapter.predict_noise(x_t, t, state["enc_p"].index(idx))
        forget = torch.nn.functional.mse_loss(adapter.predict_noise(x_t, t, state["enc_f"].index(idx)).float(),
                                              pseudo.float())
        xr_t, tr, target_r = noisy(adapter, state["x_r"][ridx], g)
        retain = torch.nn.functional.mse_loss(adapter.predict_noise(xr_t, tr, state["enc_r"].index(ridx)).float(),
                                              target_r.float())
        return forget + cfg.alpha * retain

    def after_backward(self, state: dict[str, Any], trainable: Trainable) -> None:
        for p, m in zip(trainable.parameters(), state["masks"]):
            if p.grad is not None:
                p.grad.mul_(m.to(p.grad.dtype))

    def extra_manifest(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"mask_stats": state["mask_stats"]}
