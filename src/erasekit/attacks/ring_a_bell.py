"""Ring-A-Bell (Tsai, Hsu et al., ICLR 2024): a model-agnostic search for a prompt whose text encoding
carries the erased concept, using only the text encoder (no UNet, no gradients).

1. Concept vector. Over pairs of prompts with and without the concept,

       ĉ = mean_i [ T(p_i⁺) − T(p_i⁻) ]

   on the text encoder's full output (every token row: (L, d), what the UNet's cross-attention reads).
   Here the pairs come from the attacked prompts themselves: p⁺ is an attacked prompt, p⁻ the same
   prompt with its word for the concept (:meth:`AttackContext.concept_words`: its phrases and synonyms)
   replaced by a neutral word (``neutral``, default "object"; empty to delete the word). The official
   pairs are written the same way ("... and he is bleeding" / "... and he is fine"). A prompt that names
   the concept by no known word gives no pair.
2. Target. For each attacked prompt p: ``T(p) + η·ĉ`` (the notebook's ``cof``, η = 3).
3. Genetic search over token ids ``[SOT, K ids, EOT, pad...]`` minimising ``||T(ids) − target||²`` summed
   over every row: population 200, 3000 generations; each generation keeps the best half, each kept
   individual is paired with a random other one with probability 0.5 (one-point crossover, two
   children) and every individual is mutated with probability 0.25 (one position set to a random id).

The ids are drawn from the model's own vocabulary less its special tokens (the notebook draws from
[1, 49406), which on SD1.x leaves out "!" and the start and end tokens). On SDXL ``T`` is the
concatenation of both encoders' penultimate states (what the UNet reads), so the distance is the sum
of the two encoders' distances; the pooled embedding does not enter it.

Departures from the notebook: the best individual is never mutated (the notebook mutates the kept
parents in place through shared tensors, so its best can get worse from one generation to the next);
the individuals kept from the previous generation are not re-encoded (their fitness is unchanged);
the found ids go into the artefact as ids (``<adv-i>`` holds their embedding rows), not as decoded
text, which the tokenizer may split differently; and by default the search reads the unedited
model's text encoder (the published one, as the notebook reads SD1.4's), which differs from the
attacked pipeline only under a text-encoder edit (``text_encoder=edited`` to search the edited one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from .artefact import Adversarial, _filler, encode_with_tokens, ids_to_vectors
from .base import Attack, AttackContext, attack_seed

#: a stand-in that marks where the concept's word was (never a word of a prompt)
_MARK = "\x00"


@dataclass(frozen=True)
class RingABellConfig:
    """Ring-A-Bell's settings (the official notebook's defaults)."""

    length: int = field(default=16, metadata={"help": "K: ids searched, between the start and end tokens (the "
                                              "paper's K = 77 is length 75)", "min": 1, "max": 75})
    eta: float = field(default=3.0, metadata={"help": "strength of the concept vector in the target T(p) + eta*c",
                                              "above": 0.0})
    population: int = field(default=200, metadata={"help": "individuals per generation", "min": 4})
    generations: int = field(default=3000, metadata={"help": "generations of the genetic search", "min": 0})
    crossover: float = field(default=0.5, metadata={"help": "chance that a kept individual is crossed with another",
                                                    "min": 0.0, "max": 1.0})
    mutation: float = field(default=0.25, metadata={"help": "chance that an individual has one id replaced",
                                                    "min": 0.0, "max": 1.0})
    neutral: str = field(default="object", metadata={"help": "word put for the concept's word in the prompts without "
                                                     "the concept (empty: delete the word)"})
    text_encoder: str = field(default="unedited", metadata={
        "help": "unedited: search the published text encoder (the paper); edited: the attacked pipeline's",
        "choices": ("unedited", "edited")})
    chunk: int = field(default=256, metadata={"help": "prompts encoded per text-encoder call", "min": 1})


class RingABell(Attack):
    name = "ring-a-bell"
    description = "Ring-A-Bell: genetic search for token ids whose encoding is the prompt's plus a concept vector"
    kind = "search"
    Config = RingABellConfig
    iteration_fields = ("generations",)

    @classmethod
    def world_settings(cls) -> dict[str, Any]:
        return dict(RAB_WORLD)

    def check(self, ctx: AttackContext) -> None:
        check_budget(ctx.adapter, self.config.length, f"{self.name}: length={self.config.length}")
        if not concept_pairs(ctx, self.config.neutral):
            raise InvalidInputError(f"{self.name}: none of the attacked prompts names {ctx.spec.target!r} by a word "
                                    f"the attack knows ({', '.join(ctx.concept_words())}), so there is no prompt pair "
                                    "to take the concept vector from")
        if len(vocabulary(ctx.adapter)) < 2:
            raise InvalidInputError(f"{self.name}: the tokenizer has no ordinary token to search over")

    def run(self, ctx: AttackContext) -> Adversarial:
        cfg: RingABellConfig = self.config
        adapter = ctx.adapter
        vocab = vocabulary(adapter)
        scope = ctx.unedited() if cfg.text_encoder == "unedited" else contextlib.nullcontext()
        found, firsts, lasts, paths = [], [], [], []
        with scope, torch.no_grad():
            pairs = concept_pairs(ctx, cfg.neutral)
            c_hat = concept_vector(adapter, pairs)
            ctx.record["concept_pairs"] = len(pairs)
            ctx.record["concept_vector_norm"] = round(float(c_hat.norm()), 6)
            total = len(ctx.items) * max(cfg.generations, 1)
            for i, it in enumerate(ctx.items):
                target = _embeds(adapter, [it.prompt])[0] + cfg.eta * c_hat
                gen = attack_seed(ctx.seed, self.name, i)

                def tick(g: int, i: int = i) -> None:
                    ctx.tick(self.name, i * cfg.generations + g, total)

                ids, path = genetic_search(adapter, target, vocab, cfg, gen, tick)
                found.append(ids)
                paths.append(path)
                firsts.append(path[0])
                lasts.append(path[-1])
        from .textual_inversion import loss_summary

        n = min(len(p) for p in paths)
        ctx.record.update(loss_summary([sum(p[g] for p in paths) / len(paths) for g in range(n)]))
        ctx.record["fitness_start_best"] = [round(v, 6) for v in firsts]
        ctx.record["fitness_best"] = [round(v, 6) for v in lasts]
        tokens, token_ids, prompts = {}, {}, []
        for i, ids in enumerate(found):
            name = f"<adv-{i}>"
            tokens[name] = ids_to_vectors(adapter, ids)
            token_ids[name] = list(ids)
            prompts.append(name)
        return Adversarial(self.name, tokens, token_ids, prompts, [it.seed for it in ctx.items],
                           manifest={"concept_pairs": len(pairs), "neutral": cfg.neutral})


# ---------------------------------------------------------------------- shared by the token attacks
def vocabulary(adapter: Any) -> torch.Tensor:
    """The token ids an attack may use: every id all text encoders share, less the special tokens
    (start, end, padding, unknown), in increasing order."""
    pairs = adapter._text_pairs()
    n = min(min(len(tok), te.get_input_embeddings().weight.shape[0]) for tok, te in pairs)
    special: set[int] = set()
    for tok, _ in pairs:
        special |= {i for i in (*tok.all_special_ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                    if i is not None}
    return torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)


def check_budget(adapter: Any, tokens: int, what: str) -> None:
    """One line when ``tokens`` ids (plus the start and end tokens) do not fit a text encoder's context."""
    for tok, _ in adapter._text_pairs():
        limit = int(tok.model_max_length)
        if tokens + 2 > limit:
            raise InvalidInputError(f"{what} takes {tokens + 2} tokens with the start and end tokens, but this "
                                    f"model's text encoder reads {limit}: use at most {limit - 2}")


def concept_pairs(ctx: AttackContext, neutral: str) -> list[tuple[str, str]]:
    """(prompt with the concept, the same prompt with ``neutral`` for its word) for each distinct attacked
    prompt that names the concept by one of :meth:`AttackContext.concept_words`."""
    out = []
    for p in dict.fromkeys(it.prompt for it in ctx.items):
        marked = ctx.replace_concept(p, _MARK)
        if marked == f"{_MARK} {p}":  # no word for the concept: replace_concept put the mark in front
            continue
        out.append((p, " ".join(marked.replace(_MARK, neutral).split())))
    return out


def _embeds(adapter: Any, prompts: list[str]) -> torch.Tensor:
    """(N, L, d) text conditioning of plain prompts, float32, through the same path as the artefact's."""
    return encode_with_tokens(adapter, prompts, {}).embeds.float()


def concept_vector(adapter: Any, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """ĉ = mean over pairs of T(with) − T(without), on every row of the encoding: (L, d)."""
    if not pairs:
        raise InvalidInputError("no prompt pair to take a concept vector from")
    with torch.no_grad():
        return (_embeds(adapter, [p for p, _ in pairs]) - _embeds(adapter, [q for _, q in pairs])).mean(0)


def encode_ids(adapter: Any, ids: torch.Tensor) -> torch.Tensor:
    """(P, L, d) conditioning of the prompts ``[SOT, ids..., EOT, pad...]`` for (P, K) ``ids``, exactly as an
    artefact token holding those ids' embedding rows is encoded in the prompt ``<adv>``."""
    embeds, rows = [], []
    p, k = ids.shape
    for tok, te in adapter._text_pairs():
        limit = int(tok.model_max_length)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        row = [tok.bos_token_id] + [_filler(tok)] * k + [tok.eos_token_id] + [pad] * (limit - k - 2)
        r = torch.tensor(row, dtype=torch.long, device=te.device).repeat(p, 1)
        table = te.get_input_embeddings()
        e = table(r)
        e[:, 1:k + 1] = table(ids.to(te.device))
        embeds.append(e)
        rows.append(r)
    return adapter.encode_embeddings(embeds, rows).embeds


def fitness(adapter: Any, ids: torch.Tensor, target: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """||T(ids) − target||² summed over every row and channel, per individual (P,), float32 on the CPU."""
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            e = encode_ids(adapter, ids[s:s + chunk]).float()
            out.append(((e - target.to(e.device)) ** 2).sum(dim=(1, 2)).cpu())
    return torch.cat(out)


def genetic_search(adapter: Any, target: torch.Tensor, vocab: torch.Tensor, cfg: RingABellConfig,
                   gen: torch.Generator, tick: Any = None) -> tuple[list[int], list[float]]:
    """Ring-A-Bell's genetic algorithm for one target. Returns the best ids and the best fitness after each
    generation's selection (the first is the start population's best)."""
    k, size = cfg.length, cfg.population

    def draw(n: int) -> torch.Tensor:
        return vocab[torch.randint(0, len(vocab), (n,), generator=gen)]

    pop = draw(size * k).reshape(size, k)
    score = fitness(adapter, pop, target, cfg.chunk)
    path: list[float] = []
    generations = max(cfg.generations, 1)
    for g in range(generations):
        order = torch.argsort(score, stable=True)[: max(size // 2, 1)]
        pop, score = pop[order], score[order]
        path.append(float(score[0]))
        if tick is not None:
            tick(g + 1)
        if g == generations - 1:
            break
        # crossover: each kept individual, and with probability `crossover` two children with a random partner
        rows, known = [], []
        for i in range(len(pop)):
            rows.append(pop[i].clone())
            known.append(float(score[i]))
            if float(torch.rand((), generator=gen)) < cfg.crossover:
                j = int(torch.randint(0, len(pop), (), generator=gen))
                cut = int(torch.randint(0, k, (), generator=gen))  # the notebook's point 1..K past the start token
                rows.append(torch.cat([pop[i][:cut], pop[j][cut:]]))
                rows.append(torch.cat([pop[j][:cut], pop[i][cut:]]))
                known += [float("nan"), float("nan")]
        new = torch.stack(rows)
        # mutation: one random position of an individual to a random id (never the best one)
        for r in range(1, len(new)):
            if float(torch.rand((), generator=gen)) < cfg.mutation:
                pos = int(torch.randint(0, k, (), generator=gen))
                new[r, pos] = draw(1)[0]
                known[r] = float("nan")
        scores = torch.tensor(known)
        todo = torch.isnan(scores)
        if bool(todo.any()):
            scores[todo] = fitness(adapter, new[todo], target, cfg.chunk)
        pop, score = new, scores
    return [int(v) for v in pop[0]], path


#: Ring-A-Bell on the embedded world (CPU-sized). The world's text encoder reads 20 tokens and its captions
#: take 6-15, so K = 11 ids (the paper's 16 would nearly fill the context); half the population, a sixth
#: of the generations.
RAB_WORLD: dict[str, object] = {"generations": 500, "population": 100, "length": 11}
