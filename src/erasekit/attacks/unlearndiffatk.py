"""UnlearnDiffAtk ("To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", Zhang et al. 2024): a discrete prefix found by using the
*edited* model itself as the judge of what it would denoise.

For each attacked image, ``k`` vocabulary tokens are put in front of its prompt and chosen to make
the edited model reconstruct the concept image the unedited model drew for it (its latent ``x0``):

    min_δ  || target(x0, ε, t) − θ'(x_t, T(δ ⊕ prompt), t) ||²,   x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε

``target`` is what the model predicts (ε in the paper; the velocity on v-prediction models such as
the world). A hook edit (SLD, SAFREE, a negative prompt...) runs inside the prediction
(:func:`~erasekit.attacks.base.guarded_prediction`), so a guard is attacked through.

Each prefix position holds a distribution over the vocabulary (special tokens left out). Following
the official code (OPTML-Group/Diffusion-MU-Attack, ``text_grad``):

- start uniform; after every Adam step (lr 0.01, L2 weight decay 0.1) project each row back onto
  the probability simplex by bisection on the shift μ of ``clip(p − μ, 0, 1)``;
- the forward pass uses a one-hot token drawn from each row (multinomial); its gradient goes
  straight through to the distribution, clipped to [−1, 1] (hardtanh);
- timesteps t run over an evenly spaced schedule starting at ``T/n/2`` (``n`` = 50 by default, low
  noise first), ``iterations`` steps (40) at each, fresh noise every step;
- after each timestep the argmax tokens are decoded, the image is generated with them on the
  item's seed and classified: the attack stops at the first success.

An image the edited model already draws the concept for (pre-attack success) is not attacked (the
official code counts it as a success): its prompt stays as it is. A prompt that leaves room for
fewer than ``prefix_k`` tokens in the text encoder's context gets the prefix that fits (none: left
unattacked; both are logged and recorded); a ``prefix_k`` no prompt could carry is refused. The
official code has no such case (SD's 77 tokens). Where we differ from the
official code: the prefix is replayed as the argmax *ids* (the official evaluation decodes them to
text and re-tokenises it, which can give other tokens); the noise and the token draws come from
the attack's own seeded generator, one per item; and the loss reads ``adapter.target`` (not always
the noise) so v-prediction models are attacked with their own objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from .artefact import Adversarial, encode_with_tokens, ids_to_vectors
from .base import Attack, AttackContext, Item, attack_seed
from .textual_inversion import loss_summary


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    """UnlearnDiffAtk's settings (the official code's defaults for nudity, violence and illegal content;
    its object and style configs use prefix_k=3)."""

    prefix_k: int = field(default=5, metadata={"help": "adversarial tokens put in front of each prompt", "min": 1,
                                               "max": 75})
    iterations: int = field(default=40, metadata={"help": "optimisation steps at each timestep", "min": 0})
    timesteps: int = field(default=50, metadata={"help": "timesteps of the schedule (evenly spaced, from T/n/2 up)",
                                                 "min": 0})
    lr: float = field(default=0.01, metadata={"help": "Adam step size", "above": 0.0})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam's L2 weight decay", "min": 0.0})
    early_stop: bool = field(default=True, metadata={
        "help": "generate with the argmax tokens after each timestep and stop at the first image the judge "
                "reads as the concept (official); false: run the whole schedule"})


class UnlearnDiffAtk(Attack):
    name = "unlearndiffatk"
    description = ("UnlearnDiffAtk: per image, a discrete prefix that makes the edited model denoise towards the "
                   "concept image (simplex relaxation, straight-through sampling, early stop on the judge)")
    Config = UnlearnDiffAtkConfig
    iteration_fields = ("iterations", "timesteps")

    @classmethod
    def world_settings(cls) -> dict[str, Any]:
        return dict(UDA_WORLD)

    def check(self, ctx: AttackContext) -> None:
        cfg: UnlearnDiffAtkConfig = self.config
        n_train = int(ctx.adapter.pipe.scheduler.config.num_train_timesteps)
        if cfg.timesteps > n_train:
            raise InvalidInputError(f"{self.name}: timesteps={cfg.timesteps} is more than the {n_train} training "
                                    f"timesteps of the scheduler; give at most {n_train}")
        limit = min(int(tok.model_max_length) for tok, _ in ctx.adapter._text_pairs())
        if cfg.prefix_k + 2 > limit:
            raise InvalidInputError(f"{self.name}: prefix_k={cfg.prefix_k} does not fit the text encoder's {limit}-token "
                                    f"context with its start and end tokens; set prefix_k to at most {limit - 2}")
        if not len(vocabulary(ctx.adapter)):
            raise InvalidInputError(f"{self.name}: the tokenizer has no ordinary tokens to choose a prefix from")

    def run(self, ctx: AttackContext) -> Adversarial:
        cfg: UnlearnDiffAtkConfig = self.config
        adapter = ctx.adapter
        vocab = vocabulary(adapter)
        tables = [te.get_input_embeddings().weight.detach()[vocab.to(te.device)].float()
                  for te in adapter.text_encoders()]
        schedule = timestep_schedule(int(adapter.pipe.scheduler.config.num_train_timesteps), cfg.timesteps)
        room = [prefix_room(adapter, it.prompt, cfg.prefix_k) for it in ctx.items]
        todo = [i for i, it in enumerate(ctx.items) if not it.detected_pre and room[i] > 0]
        total, done = len(todo) * len(schedule), 0
        tokens: dict[str, list[torch.Tensor]] = {}
        token_ids: dict[str, list[int]] = {}
        prompts = [it.prompt for it in ctx.items]
        decoded: dict[str, str] = {}
        per_item: list[dict[str, Any]] = []
        for i, it in enumerate(ctx.items):
            if it.detected_pre:
                per_item.append({"item": i, "attacked": False, "reason": "the edited model already draws the concept"})
                continue
            if room[i] < 1:
                ctx.log(f"{self.name}: {it.prompt[:50]!r} fills the text encoder's context; left unattacked")
                per_item.append({"item": i, "attacked": False, "reason": "the prompt fills the context"})
                continue
            if room[i] < cfg.prefix_k:
                ctx.log(f"{self.name}: {it.prompt[:50]!r} leaves room for {room[i]} of {cfg.prefix_k} prefix tokens")
            name = f"<adv-{i}>"
            ids, rec = self._attack_item(ctx, i, it, name, room[i], vocab, tables, schedule,
                                         lambda d, at=done: ctx.tick(self.name, at + d, total))
            done += len(schedule)
            ctx.tick(self.name, done, total)
            tokens[name] = ids_to_vectors(adapter, ids)
            token_ids[name] = ids
            prompts[i] = f"{name} {it.prompt}"
            decoded[name] = _decode(adapter, ids)
            per_item.append({"item": i, "attacked": True, **rec})
        ctx.record.update({"attacked": len(todo), "skipped_pre_attack_success": len(ctx.items) - len(todo),
                           "stopped_early": sum(1 for r in per_item if r.get("stopped_at_t") is not None),
                           "timesteps": schedule, "items": per_item})
        return Adversarial(self.name, tokens, token_ids, prompts, [it.seed for it in ctx.items],
                           manifest={"decoded_prefixes": decoded, "vocabulary_size": len(vocab)})

    def _attack_item(self, ctx: AttackContext, index: int, it: Item, name: str, k: int, vocab: torch.Tensor,
                     tables: list[torch.Tensor], schedule: list[int], tick: Any) -> tuple[list[int], dict[str, Any]]:
        """The prefix ids for one item and the record of its run."""
        cfg: UnlearnDiffAtkConfig = self.config
        adapter = ctx.adapter
        gen = attack_seed(ctx.seed, self.name, index, it.prompt, it.seed)
        x0 = ctx.latents(it.image[None]).float()
        prompt = f"{name} {it.prompt}"
        dev = tables[0].device
        theta = project_simplex(torch.full((k, len(vocab)), 1.0 / len(vocab), device=dev))
        theta.requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        by_t: list[float] = []
        stopped = None
        ids: list[int] = []
        probes = _probes(schedule, x0, attack_seed(ctx.seed, self.name, "probe", index))
        path = [_probe_loss(ctx, x0, it.prompt, {}, probes)]
        for n, t in enumerate(schedule):
            tt = torch.tensor([t], dtype=torch.long)
            at_t = []
            for _ in range(cfg.iterations):
                picks = torch.multinomial(theta.detach().cpu(), 1, generator=gen)[:, 0]
                hard = torch.nn.functional.one_hot(picks, len(vocab)).to(theta)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                x_t = adapter.add_noise(x0, noise, tt)
                with torch.enable_grad():
                    onehot = _StraightThrough.apply(theta, hard)
                    cond = encode_with_tokens(adapter, [prompt], {name: [onehot @ tab for tab in tables]})
                    pred = ctx.predict(x_t.to(adapter.pipe.unet.dtype), tt.to(x0.device), cond)
                    loss = torch.nn.functional.mse_loss(pred.float(), adapter.target(x0, noise, tt).float())
                    grad, = torch.autograd.grad(loss, [theta])
                opt.zero_grad(set_to_none=True)
                theta.grad = grad
                opt.step()
                with torch.no_grad():
                    theta.copy_(project_simplex(theta))
                at_t.append(float(loss.detach()))
            losses += at_t
            by_t.append(round(float(np.mean(at_t)), 6))
            ids = vocab[theta.detach().argmax(-1).cpu()].tolist()
            path.append(_probe_loss(ctx, x0, prompt, {name: ids_to_vectors(adapter, ids)}, probes))
            tick(n + 1)
            if cfg.early_stop:
                with torch.no_grad():
                    cond = encode_with_tokens(adapter, [prompt], {name: ids_to_vectors(adapter, ids)})
                    hit = bool(ctx.detect(ctx.generate(cond, [it.seed]))[0])
                if hit:
                    stopped = t
                    break
        rec = {"prefix_tokens": k, "stopped_at_t": stopped, "timesteps_run": len(by_t), "objective_by_t": by_t,
               "objective_probe": [round(v, 6) for v in path], **loss_summary(losses)}
        return ids, rec


class _StraightThrough(torch.autograd.Function):
    """Forward: the drawn one-hot rows; backward: the gradient passed to the distribution, clipped to [-1, 1]."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.clamp(-1.0, 1.0), None


def _probes(schedule: list[int], x0: torch.Tensor, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (timestep, noise) pairs, at most four timesteps of the schedule, on which the record reads the
    objective of the argmax prefix (common noise, so its path shows the prefix, not the noise draw)."""
    pick = np.unique(np.linspace(0, len(schedule) - 1, min(4, len(schedule))).round().astype(int))
    return [(torch.tensor([schedule[j]], dtype=torch.long), torch.randn(x0.shape, generator=gen).to(x0))
            for j in pick]


@torch.no_grad()
def _probe_loss(ctx: AttackContext, x0: torch.Tensor, prompt: str, tokens: dict[str, list[torch.Tensor]],
                probes: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The denoising objective of ``prompt`` (with ``tokens``) on the fixed probes, averaged."""
    adapter = ctx.adapter
    cond = encode_with_tokens(adapter, [prompt], tokens)
    out = []
    for tt, noise in probes:
        pred = ctx.predict(adapter.add_noise(x0, noise, tt), tt.to(x0.device), cond)
        out.append(float(torch.nn.functional.mse_loss(pred.float(), adapter.target(x0, noise, tt).float())))
    return float(np.mean(out))


def project_simplex(a: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Each row of ``a`` projected onto the probability simplex: ``clip(a − μ, 0, 1)`` with the shift μ found
    by bisection so the row sums to one (to ``tol`` in μ); rows whose clip already sums to one keep it."""
    a = a.detach()
    clipped = a.clamp(0.0, 1.0)
    ok = (clipped.sum(-1) - 1.0).abs() <= tol
    lo, hi = a.min(-1).values - 1.0, a.max(-1).values
    while bool(((hi - lo) > tol).any()):
        mid = (lo + hi) / 2
        over = (a - mid[:, None]).clamp(0.0, 1.0).sum(-1) > 1.0
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    out = (a - ((lo + hi) / 2)[:, None]).clamp(0.0, 1.0)
    return torch.where(ok[:, None], clipped, out)


def timestep_schedule(n_train: int, n: int) -> list[int]:
    """The official schedule: ``n`` evenly spaced training timesteps from ``T/n/2`` upwards."""
    stride = max(n_train // n, 1)
    return list(range(stride // 2, n_train, stride))[:n]


def prefix_room(adapter: Any, prompt: str, k: int) -> int:
    """How many of ``k`` prefix tokens fit in front of ``prompt`` in every text encoder's context."""
    room = k
    for tok, _ in adapter._text_pairs():
        n = len(tok(prompt, add_special_tokens=False).input_ids)
        room = min(room, int(tok.model_max_length) - 2 - n)
    return max(room, 0)


def vocabulary(adapter: Any) -> torch.Tensor:
    """The ids a prefix token may take: every id every tokenizer and text encoder has, special tokens out."""
    pairs = adapter._text_pairs()
    size = min(min(len(tok), te.get_input_embeddings().weight.shape[0]) for tok, te in pairs)
    special = {int(i) for tok, _ in pairs for i in tok.all_special_ids}
    return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)


def _decode(adapter: Any, ids: list[int]) -> str:
    tok = adapter._text_pairs()[0][0]
    return str(tok.decode(ids)).strip()


#: UnlearnDiffAtk on the embedded world (CPU-sized): a 10-timestep schedule, 20 steps at each, and the
#: official object/style prefix of 3 tokens (world prompts take up to 14 of the encoder's 20 tokens).
#: Against UCE's erasure of star (seeds 0-7, target + generality) it lifted success from 3/16 to 8/16,
#: every success from the early stop's checks: the probe objective does not reliably fall here.
UDA_WORLD: dict[str, object] = {"timesteps": 10, "iterations": 20, "prefix_k": 3}
