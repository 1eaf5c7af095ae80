"""Concept arithmetic: rebuild an erased concept by composing guidance from several prompts.

Composable Diffusion (Liu et al. 2022) showed that classifier-free guidance terms add up: the
guided prediction ``ε_∅ + Σ_i w_i (ε(c_i) − ε_∅)`` draws the conjunction of the positive terms
and steers away from the negative ones. "Concept Arithmetics for Circumventing Concept Inhibition
in Diffusion Models" (Petsiuk & Saenko, 2024) turns that into an attack on erasure: an edit that
silences one phrase rarely silences every prompt that leads to the concept, and a signed, weighted
sum of such prompts can bring it back where no single prompt does. We found no official code for
it and checked nothing against one; the candidate pool and the search below are our own, built on
that idea.

The artefact keeps each attacked prompt and adds terms ``(prompt, weight)`` (the term ``{prompt}``
is the attacked prompt itself, with weight ``prompt_weight``), applied by
:class:`~erasekit.attacks.artefact.ArithmeticHook` as ``u + Σ w_i (p_i − u)``, ``p_i`` the guided
prediction of term i and ``u`` the unconditional one (hook edits underneath act on every term).
One recipe serves the whole concept: every attacked prompt gets the same terms.

Candidate terms (the pool), each written into ``template``:

- the concept's words (:meth:`AttackContext.concept_words`: the erased phrase, its synonyms, and on
  the world every synonym the vocabulary has) with positive weights: a synonym the edit left
  intact brings the concept back; the erased word itself amplifies what is left of it;
- the concept's neighbours with negative weights (``spec.neighbours``, else the judge's other labels
  on the concept's axis, e.g. the other shapes; ``max_neighbours`` of them at most): subtracting
  what the edit tends to draw instead pushes towards what is left;
- the concept's anchor (what the edit maps it to), when it has one, with a negative weight.

The search (a coordinate search): the plain prompt first (the baseline), then each candidate alone
at weight ±1, then moves around the best recipe so far: add a candidate that beat the baseline on
its own (weight drawn in ``[0.5, max_weight]``), rescale a term's weight (×0.5, ×0.75, ×1.5, ×2,
|w| kept in ``[0.25, max_weight]``) or drop a term, at most ``max_terms`` candidate terms, each
recipe scored once. A recipe's score is the judge's reading of images of ``search_prompts`` of the
attacked prompts on ``search_seeds`` seeds *disjoint* from the attacked images' seeds (so the
post-attack measurement is not the search's own score): the share read as the concept, ties
broken by the judge's mean probability for it. The search stops when every search image shows the
concept or after ``trials`` recipes. It needs classifier-free guidance (``guidance_scale > 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import Encoded
from ..errors import InvalidInputError
from .artefact import PROMPT_SLOT, Adversarial, ArithmeticHook, encode_with_tokens
from .base import Attack, AttackContext, attack_seed


@dataclass(frozen=True)
class ConceptArithmeticConfig:
    """Concept arithmetic's search settings (no official code: ours)."""

    trials: int = field(default=32, metadata={"help": "recipes scored (the plain prompt and each candidate alone first, "
                                              "then moves around the best)", "min": 0})
    max_terms: int = field(default=3, metadata={"help": "candidate terms a recipe adds to the prompt at most", "min": 1,
                                                "max": 8})
    max_weight: float = field(default=2.0, metadata={"help": "largest |weight| of a candidate term", "above": 0.25})
    prompt_weight: float = field(default=1.0, metadata={"help": "weight of the attacked prompt's own term {prompt}",
                                                        "min": 0.0})
    template: str = field(default="a photo of a {}", metadata={"help": "how a candidate word becomes a prompt",
                                                               "each_contains": "{}"})
    neighbours: bool = field(default=True, metadata={"help": "subtract the concept's neighbours (negative terms)"})
    max_neighbours: int = field(default=8, metadata={"help": "neighbours in the pool at most (the first ones)",
                                                     "min": 0})
    search_prompts: int = field(default=2, metadata={"help": "attacked prompts a recipe is scored on", "min": 1})
    search_seeds: int = field(default=2, metadata={"help": "seeds per prompt a recipe is scored on (disjoint from the "
                                                   "attacked images' seeds)", "min": 1})


@dataclass(frozen=True)
class Candidate:
    prompt: str
    sign: float
    kind: str


class ConceptArithmetic(Attack):
    name = "concept-arithmetic"
    description = ("Concept arithmetic: compose guidance from the concept's other words and its neighbours (signed "
                   "weights) to rebuild it; weights searched on the judge with seeds the evaluation does not use")
    kind = "search"
    Config = ConceptArithmeticConfig
    iteration_fields = ("trials",)

    @classmethod
    def world_settings(cls) -> dict[str, Any]:
        return dict(ARITHMETIC_WORLD)

    def check(self, ctx: AttackContext) -> None:
        if ctx.guidance <= 1:
            raise InvalidInputError(f"{self.name} composes classifier-free guidance; sample with guidance_scale > 1 "
                                    f"(got {ctx.guidance:g})")
        if ctx.adapter.pipe.unet.config.time_cond_proj_dim is not None:
            raise InvalidInputError(f"{self.name} needs an unconditional prediction, but this model takes guidance as an "
                                    "embedding (no classifier-free guidance); attack it with another attack")

    def pool(self, ctx: AttackContext) -> list[Candidate]:
        """The candidate terms, concept words first (longest first), then neighbours, then the anchor."""
        cfg: ConceptArithmeticConfig = self.config
        out = [Candidate(cfg.template.format(w), 1.0, "concept") for w in ctx.concept_words()]
        if cfg.neighbours:
            labels = list(ctx.spec.neighbours)
            if not labels:
                labels = [lab for lab in ctx.judge.axes().get(ctx.axis, []) if lab.lower() != ctx.label.lower()]
            out += [Candidate(cfg.template.format(n), -1.0, "neighbour") for n in labels[:cfg.max_neighbours]]
        if ctx.spec.anchor:
            out.append(Candidate(cfg.template.format(ctx.spec.anchor), -1.0, "anchor"))
        seen: set[str] = set()
        return [c for c in out if not (c.prompt in seen or seen.add(c.prompt))]  # type: ignore[func-returns-value]

    def run(self, ctx: AttackContext) -> Adversarial:
        cfg: ConceptArithmeticConfig = self.config
        gen = attack_seed(ctx.seed, self.name)
        pool = self.pool(ctx)
        prompts = _search_prompts(ctx, cfg.search_prompts)
        seeds = _search_seeds(gen, {it.seed for it in ctx.items}, cfg.search_seeds)
        rows = [(p, s) for p in prompts for s in seeds]
        # through the token path, so the conditioning carries its tokens (SAFREE reads them) and matches the
        # artefact's replay encoding
        cond = Encoded.cat([encode_with_tokens(ctx.adapter, [p], {}) for p, _ in rows])
        head = [(PROMPT_SLOT, float(cfg.prompt_weight))]
        trials: list[dict[str, Any]] = []
        tried: set[tuple[tuple[str, float], ...]] = set()
        queue: list[list[tuple[str, float]]] = [[]] + [[(c.prompt, c.sign)] for c in pool]
        best: dict[str, Any] | None = None
        best_extra: list[tuple[str, float]] = []
        for n in range(cfg.trials):
            extra = queue.pop(0) if queue else _propose(best_extra, _helpful(pool, trials), cfg, gen, tried)
            if extra is None:
                break  # every move around the best recipe was tried
            tried.add(_key(extra))
            terms = head + extra
            with torch.no_grad():
                images = ctx.generate(cond, [s for _, s in rows], [ArithmeticHook(terms)])
            hits, probs = _read(ctx, images)
            row = {"terms": [[p, w] for p, w in terms], "detected": round(float(hits.mean()), 6),
                   "probability": round(float(probs.mean()), 6)}
            trials.append(row)
            if best is None or (row["detected"], row["probability"]) > (best["detected"], best["probability"]):
                best, best_extra = row, extra
            ctx.tick(self.name, n + 1, cfg.trials)
            if best["detected"] >= 1.0:
                break
        assert best is not None  # trials >= 1
        ctx.tick(self.name, cfg.trials, cfg.trials)
        chosen = [(str(p), float(w)) for p, w in best["terms"]]
        ctx.record.update({"pool": [{"prompt": c.prompt, "sign": c.sign, "kind": c.kind} for c in pool],
                           "search_prompts": prompts, "search_seeds": seeds, "baseline": trials[0],
                           "best": best, "trials_run": len(trials), "trials": trials})
        return Adversarial(self.name, prompts=[it.prompt for it in ctx.items], seeds=[it.seed for it in ctx.items],
                           terms=chosen, manifest={"search_seeds": seeds, "search_score": best["detected"]})


def _key(extra: list[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((p, round(float(w), 2)) for p, w in extra))


def _helpful(pool: list[Candidate], trials: list[dict[str, Any]]) -> list[Candidate]:
    """The candidates that scored above the plain prompt alone (all of them when none did)."""
    if not trials:
        return pool
    base = (trials[0]["detected"], trials[0]["probability"])
    alone = {t["terms"][1][0]: (t["detected"], t["probability"]) for t in trials[1:] if len(t["terms"]) == 2}
    good = [c for c in pool if c.prompt in alone and alone[c.prompt] > base]
    return good or pool


def _propose(best: list[tuple[str, float]], helpful: list[Candidate], cfg: ConceptArithmeticConfig,
             gen: torch.Generator, tried: set[tuple[tuple[str, float], ...]]) -> list[tuple[str, float]] | None:
    """A move around the best recipe not tried yet (None when 50 draws found none): add a helpful candidate,
    rescale a term's weight, or drop a term."""
    for _ in range(50):
        moves = []
        free = [c for c in helpful if c.prompt not in {p for p, _ in best}]
        if free and len(best) < cfg.max_terms:
            moves.append("add")
        if best:
            moves += ["scale", "scale", "drop"]
        if not moves:
            return None
        move = moves[int(torch.randint(len(moves), (1,), generator=gen))]
        new = list(best)
        if move == "add":
            c = free[int(torch.randint(len(free), (1,), generator=gen))]
            w = 0.5 + (cfg.max_weight - 0.5) * float(torch.rand(1, generator=gen))
            new.append((c.prompt, round(c.sign * max(0.25, min(w, cfg.max_weight)), 2)))
        elif move == "scale":
            i = int(torch.randint(len(new), (1,), generator=gen))
            f = (0.5, 0.75, 1.5, 2.0)[int(torch.randint(4, (1,), generator=gen))]
            p, w = new[i]
            new[i] = (p, round(float(np.sign(w)) * min(max(abs(w) * f, 0.25), cfg.max_weight), 2))
        else:
            new.pop(int(torch.randint(len(new), (1,), generator=gen)))
        if _key(new) not in tried:
            return new
    return None


def _search_prompts(ctx: AttackContext, n: int) -> list[str]:
    """``n`` distinct attacked prompts, those the edit keeps from the concept first, taken in turn from each set."""
    order = sorted(range(len(ctx.items)), key=lambda i: ctx.items[i].detected_pre)
    by_set: dict[str, list[str]] = {}
    for i in order:
        it = ctx.items[i]
        if it.prompt not in by_set.setdefault(it.set, []):
            by_set[it.set].append(it.prompt)
    out: list[str] = []
    queues = list(by_set.values())
    while len(out) < n and any(queues):
        for q in queues:
            while q and q[0] in out:
                q.pop(0)
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _search_seeds(gen: torch.Generator, taken: set[int], n: int) -> list[int]:
    """``n`` seeds drawn from ``gen`` that no attacked image uses."""
    out: list[int] = []
    while len(out) < n:
        s = int(torch.randint(1_000_000, 2**31 - 1, (1,), generator=gen))
        if s not in taken and s not in out:
            out.append(s)
    return out


def _read(ctx: AttackContext, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: does the judge read the concept, and its probability for it."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    probs = ctx.judge.probs(x)[ctx.axis]
    k = ctx.judge.axes()[ctx.axis].index(ctx.label)
    return (probs.argmax(-1) == k).numpy(), probs[:, k].float().numpy()


#: concept arithmetic on the embedded world (CPU-sized): fewer recipes, scored on 4 images each
ARITHMETIC_WORLD: dict[str, object] = {"trials": 24, "search_prompts": 2, "search_seeds": 2}
