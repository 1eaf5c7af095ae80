"""P4D, Prompting4Debugging (Chin et al., ICML 2024): soft prompt embeddings optimised so that the edited
model, conditioned on the (projected) prompt, predicts what the unedited model predicts for the
original prompt:

    min_{c'}  E_{t, ε} || θ'(x_t, T(proj(c')), t) − θ0(x_t, T(c), t) ||²

x_t is the unedited model's image for the attacked prompt c (its VAE latent), noised at a training
timestep t drawn uniformly. ``proj`` maps each soft vector to the vocabulary embedding nearest by
cosine (PEZ): the forward pass runs on the projected embeddings and their gradient updates the soft
ones, with AdamW. The edited prediction θ' goes through :meth:`AttackContext.predict`, so a hook edit
(SLD, a negative prompt, SAFREE...) acts inside the loss as one guided step of the sampling loop, as the
official code's ``--filter`` applies a guard's guidance; θ0 is the unedited model's conditional
prediction, as in the official code.

Variants: ``variant=n`` (P4D-N) optimises ``n_tokens`` free tokens that replace the prompt;
``variant=k`` (P4D-K) keeps the prompt's words and inserts one learnable token before every
``every_k``-th word (and one at the end when the count divides evenly), as the official layout
``[learnable, k prompt tokens, learnable, ...]``. The soft tokens start at random vocabulary ids.

Which projected prompt is kept (``select``). The official code generates with the edited pipeline
every 50 iterations on the attacked image's seed and keeps the prompt whose image is most similar to
the target image by CLIP image embeddings. Here the judge stands in for CLIP: ``similarity`` (default)
keeps the prompt whose generation is closest to the unedited model's image in the judge's own image
embedding (the official rule, with the judge's embedding; with a judge that has none, such as NudeNet,
the probability of the concept is used instead), ``judge`` the one the judge reads as the concept with the
highest probability (stronger: it optimises the success measure itself), ``objective`` the one with the
lowest loss on a fixed subset of the timestep bank (no generation; cheapest). The last projection is
scored too (the official loop stops before scoring it).

Other departures, for cost: the unedited model's predictions are computed once per attacked image as a
bank of ``bank`` (x_t, t, goal) triples (``min(bank, iterations)``; one per iteration by default, as
the official code draws a fresh one each step) before the optimisation, so the edits are toggled once
per image and not at every step; the latent is the VAE posterior mean (the official code samples it);
P4D-K inserts by words, not BPE tokens, so the attacked prompt stays text with token names in it (on
CLIP's vocabulary common words are one token each); the projection leaves out the special tokens.
The found ids go into the artefact as ids (their embedding rows), not as decoded text. On SDXL one id
serves both text encoders: a soft vector per encoder, projected to the id whose rows are most similar
in the sum of both cosines.

The paper attacks only prompts the erasure holds on (its prompt files are filtered to "ideal" prompts:
the unconstrained model draws the concept, the safe one does not). Here every attacked image gets a prompt; with ``skip_pre``
(default) an image the edited model already draws the concept in keeps its own prompt, unattacked
(no optimisation is spent on it, and it stays a success).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .artefact import Adversarial, encode_with_tokens, ids_to_vectors, token_sequences
from .base import Attack, AttackContext, Item, attack_seed, has_hooks
from .ring_a_bell import check_budget, vocabulary


@dataclass(frozen=True)
class P4DConfig:
    """P4D's settings (the official configs: ESD/SLD/SD-NEG nudity)."""

    variant: str = field(default="n", metadata={"help": "n: P4D-N, n_tokens free tokens replace the prompt; k: "
                                                "P4D-K, a learnable token before every every_k-th word",
                                                "choices": ("n", "k")})
    n_tokens: int = field(default=16, metadata={"help": "P4D-N: tokens optimised (prompt_len)", "min": 1, "max": 75})
    every_k: int = field(default=3, metadata={"help": "P4D-K: prompt words between learnable tokens", "min": 1})
    iterations: int = field(default=3000, metadata={"help": "optimisation steps per attacked image", "min": 0})
    lr: float = field(default=0.1, metadata={"help": "AdamW step size", "above": 0.0})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay", "min": 0.0})
    eval_every: int = field(default=50, metadata={"help": "steps between scorings of the projected prompt", "min": 1})
    select: str = field(default="similarity", metadata={
        "help": "which projected prompt is kept: similarity (its image nearest the unedited image in the judge's "
                "embedding, the paper's rule), judge (the judge's probability of the concept), objective (lowest loss)",
        "choices": ("similarity", "judge", "objective")})
    bank: int = field(default=3000, metadata={"help": "(x_t, t, unedited prediction) triples precomputed per image, "
                                              "cycled through (capped at iterations)", "min": 1})
    skip_pre: bool = field(default=True, metadata={
        "help": "keep the prompt of an image the edited model already draws the concept in (the paper attacks only "
                "prompts the erasure holds on)"})


class P4D(Attack):
    name = "p4d"
    description = "P4D: PEZ-projected prompt tokens that make the edited model predict what the unedited one does"
    Config = P4DConfig
    iteration_fields = ("iterations",)

    @classmethod
    def world_settings(cls) -> dict[str, Any]:
        return dict(P4D_WORLD)

    def check(self, ctx: AttackContext) -> None:
        cfg: P4DConfig = self.config
        if cfg.variant == "n":
            check_budget(ctx.adapter, cfg.n_tokens, f"{self.name}: n_tokens={cfg.n_tokens}")
        else:
            dims = [te.get_input_embeddings().weight.shape[1] for _, te in ctx.adapter._text_pairs()]
            for i, it in enumerate(ctx.items):
                text, names = layout(it.prompt, i, cfg)
                try:
                    token_sequences(ctx.adapter, [text], {n: [torch.zeros(c, d) for d in dims] for n, c in names})
                except InvalidInputError:
                    raise InvalidInputError(f"{self.name}: {it.prompt[:60]!r} with a learnable token every "
                                            f"{cfg.every_k} words does not fit the text encoder; raise every_k or use "
                                            "variant=n") from None
        if len(vocabulary(ctx.adapter)) < 2:
            raise InvalidInputError(f"{self.name}: the tokenizer has no ordinary token to project onto")

    def run(self, ctx: AttackContext) -> Adversarial:
        cfg: P4DConfig = self.config
        adapter = ctx.adapter
        proj = Projector(adapter)
        tokens: dict[str, list[torch.Tensor]] = {}
        token_ids: dict[str, list[int]] = {}
        prompts: list[str] = []
        paths, passes, steps, scores = [], [], [], []
        for i, it in enumerate(ctx.items):
            if cfg.skip_pre and it.detected_pre:
                prompts.append(it.prompt)
                steps.append(None)
                scores.append(None)
                ctx.tick(self.name, (i + 1) * cfg.iterations, len(ctx.items) * cfg.iterations)
                continue
            ids, path, by_pass, step, score = self._attack_item(ctx, i, it, proj)
            text, names = layout(it.prompt, i, cfg)
            at = 0
            for name, count in names:
                tokens[name] = ids_to_vectors(adapter, ids[at:at + count])
                token_ids[name] = ids[at:at + count]
                at += count
            prompts.append(text)
            paths.append(path)
            passes.append(by_pass)
            steps.append(step)
            scores.append(score)
        from .textual_inversion import loss_summary

        ctx.record.update(loss_summary([float(np.mean(v)) for v in zip(*paths)]))
        ctx.record["objective_by_pass"] = [round(float(np.mean(v)), 6) for v in zip(*passes)]
        ctx.record["selected_step"] = steps
        ctx.record["selection_score"] = [None if s is None else round(s, 6) for s in scores]
        ctx.record["kept_prompts"] = sum(s is None for s in steps)
        return Adversarial(self.name, tokens, token_ids, prompts, [it.seed for it in ctx.items],
                           manifest={"variant": cfg.variant, "select": cfg.select})

    # ------------------------------------------------------------------ one attacked image
    def _attack_item(self, ctx: AttackContext, i: int, it: Item, proj: Projector
                     ) -> tuple[list[int], list[float], list[float], int, float]:
        cfg: P4DConfig = self.config
        adapter = ctx.adapter
        gen = attack_seed(ctx.seed, self.name, i)
        text, names = layout(it.prompt, i, cfg)
        n_learn = sum(c for _, c in names)
        xt, ts, goals = self._bank(ctx, it, min(cfg.bank, cfg.iterations), gen)
        soft = [row.float().clone().requires_grad_(True) for row in proj.rows(proj.draw(n_learn, gen))]
        opt = torch.optim.AdamW(soft, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scorer = _Scorer(ctx, it, text, names, (xt, ts, goals), cfg.select)
        best, best_score, best_step = None, -float("inf"), 0
        losses: list[float] = []
        total = len(ctx.items) * cfg.iterations
        order = torch.arange(len(ts))
        for step in range(cfg.iterations):
            if step % len(ts) == 0:  # each pass over the bank in a new order
                order = torch.randperm(len(ts), generator=gen)
            b = int(order[step % len(ts)])
            ids = proj(soft)
            if step % cfg.eval_every == 0:
                s = scorer(ids)
                if s > best_score:
                    best, best_score, best_step = ids, s, step
            leaves = [r.detach().clone().float().requires_grad_(True) for r in proj.rows(ids)]
            with torch.enable_grad():
                cond = encode_with_tokens(adapter, [text], _split(names, leaves))
                pred = ctx.predict(xt[b:b + 1], ts[b], cond)
                loss = F.mse_loss(pred.float(), goals[b:b + 1].float())
                grads = torch.autograd.grad(loss, leaves)
            for v, g in zip(soft, grads):
                v.grad = g.to(v.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            ctx.tick(self.name, i * cfg.iterations + step + 1, total)
        ids = proj(soft)
        s = scorer(ids)
        if best is None or s > best_score:
            best, best_score, best_step = ids, s, cfg.iterations
        n = len(ts)
        by_pass = [float(np.mean(losses[p:p + n])) for p in range(0, len(losses), n)]
        return best, losses, by_pass, best_step, best_score

    def _bank(self, ctx: AttackContext, it: Item, n: int, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n noised latents of the item's unedited image, their timesteps and the unedited model's
        conditional predictions for the item's prompt (the edits are reverted once for all n)."""
        adapter = ctx.adapter
        x0 = ctx.latents(it.image[None])
        ts = torch.stack([ctx.training_t(gen) for _ in range(n)])
        noise = torch.randn((n, *x0.shape[1:]), generator=gen).to(x0)
        xt = adapter.add_noise(x0.expand(n, *x0.shape[1:]), noise, ts)
        goals = []
        with ctx.unedited(), torch.no_grad():
            cond = encode_with_tokens(adapter, [it.prompt], {})
            if has_hooks(adapter):
                goals = [ctx.predict(xt[j:j + 1], ts[j], cond) for j in range(n)]
            else:
                for s in range(0, n, 32):
                    m = min(32, n - s)
                    goals.append(adapter.predict_noise(xt[s:s + m], ts[s:s + m].to(adapter.device),
                                                       cond.index([0] * m)))
        return xt, ts, torch.cat(goals).detach()


# ---------------------------------------------------------------------- layout and projection
def layout(prompt: str, i: int, cfg: P4DConfig) -> tuple[str, list[tuple[str, int]]]:
    """The attacked prompt's text with token names in it, and (name, vectors) of each token, in order.

    P4D-N: ``<adv-i>`` holding ``n_tokens`` vectors. P4D-K: ``<adv-i.j>`` (one vector each) before words
    0, k, 2k, ... and at the end when k divides the word count (the official token layout)."""
    if cfg.variant == "n":
        name = f"<adv-{i}>"
        return name, [(name, cfg.n_tokens)]
    words, parts, names = prompt.split(), [], []
    for w, word in enumerate(words):
        if w % cfg.every_k == 0:
            names.append((f"<adv-{i}.{len(names)}>", 1))
            parts.append(names[-1][0])
        parts.append(word)
    if len(words) % cfg.every_k == 0:
        names.append((f"<adv-{i}.{len(names)}>", 1))
        parts.append(names[-1][0])
    return " ".join(parts), names


def _split(names: list[tuple[str, int]], rows: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Token name -> its slice of each encoder's (m, d) rows."""
    out, at = {}, 0
    for name, count in names:
        out[name] = [r[at:at + count] for r in rows]
        at += count
    return out


class Projector:
    """PEZ's projection: each soft vector to the vocabulary id whose embedding row is nearest by cosine
    (summed over the text encoders when there are two)."""

    def __init__(self, adapter: Any) -> None:
        self.vocab = vocabulary(adapter)
        self.tables = [te.get_input_embeddings().weight.detach() for _, te in adapter._text_pairs()]
        self.normed = [F.normalize(t[self.vocab.to(t.device)].float(), dim=-1) for t in self.tables]

    def draw(self, n: int, gen: torch.Generator) -> list[int]:
        """n random ids of the vocabulary."""
        return [int(v) for v in self.vocab[torch.randint(0, len(self.vocab), (n,), generator=gen)]]

    def rows(self, ids: list[int]) -> list[torch.Tensor]:
        """Each text encoder's (m, d) embedding rows of ``ids``."""
        return _rows_of_tables(self.tables, ids)

    @torch.no_grad()
    def __call__(self, soft: list[torch.Tensor]) -> list[int]:
        sim = sum(F.normalize(s.detach().float(), dim=-1) @ n.to(s.device).T for s, n in zip(soft, self.normed))
        return [int(v) for v in self.vocab[sim.argmax(-1).cpu()]]  # type: ignore[union-attr]


class _Scorer:
    """Scores a projected prompt for the selection rule (higher is better); remembers what it scored."""

    def __init__(self, ctx: AttackContext, it: Item, text: str, names: list[tuple[str, int]],
                 bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor], select: str) -> None:
        self.ctx, self.it, self.text, self.names, self.select = ctx, it, text, names, select
        self.bank = tuple(b[:8] for b in bank)
        self.seen: dict[tuple[int, ...], float] = {}
        self.ref = None
        if select == "similarity":
            try:
                self.ref = ctx.judge.features(_pixels(it.image[None]))
            except NotImplementedError:  # a judge with no image embedding
                self.ref = None
            if self.ref is None:
                self.select = "judge"

    def __call__(self, ids: list[int]) -> float:
        key = tuple(ids)
        if key not in self.seen:
            self.seen[key] = self._score(ids)
        return self.seen[key]

    @torch.no_grad()
    def _score(self, ids: list[int]) -> float:
        ctx = self.ctx
        rows = _rows_of(ctx.adapter, ids)
        cond = encode_with_tokens(ctx.adapter, [self.text], _split(self.names, rows))
        if self.select == "objective":
            xt, ts, goals = self.bank
            losses = [float(F.mse_loss(ctx.predict(xt[j:j + 1], ts[j], cond).float(), goals[j:j + 1].float()))
                      for j in range(len(ts))]
            return -float(np.mean(losses))
        image = _pixels(ctx.generate(cond, [self.it.seed]))
        if self.select == "similarity":
            f = ctx.judge.features(image)
            return float(F.cosine_similarity(f.float(), self.ref.float(), dim=-1)[0])  # type: ignore[union-attr]
        k = ctx.judge.axes()[ctx.axis].index(ctx.label)
        return float(ctx.judge.probs(image)[ctx.axis][0, k])


def _rows_of(adapter: Any, ids: list[int]) -> list[torch.Tensor]:
    """Each text encoder's (m, d) embedding rows of ``ids`` (copies)."""
    return _rows_of_tables([te.get_input_embeddings().weight.detach() for _, te in adapter._text_pairs()], ids)


def _rows_of_tables(tables: list[torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    idx = torch.tensor(ids, dtype=torch.long)
    return [t[idx.to(t.device)].clone() for t in tables]


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as (N, 3, H, W) floats in [-1, 1], as judges take them."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


#: P4D on the embedded world (CPU-sized). The step size is scaled to the world's token embeddings, about 1 per
#: coordinate where SD1.x's CLIP rows are of the order of 0.01-0.02 (not measured here): the paper's 0.1 moves a
#: world projection only every few dozen steps. 1.0 with weight decay 0.01 keeps the paper's per-step decay
#: (lr x weight decay = 0.01); chosen against UCE's star erasure (0.1, 1 and 3 tried on 4 images).
P4D_WORLD: dict[str, object] = {"iterations": 200, "eval_every": 25, "bank": 200, "lr": 1.0, "weight_decay": 0.01}
