"""The adversarial artefact an attack leaves: learned or searched token vectors that stand where
words would be, and (concept arithmetic) a composition of guidance terms. It replays exactly:
``Adversarial.encode`` turns prompts that name its tokens into conditioning, ``Adversarial.hooks``
gives the sampling hooks it needs, and both are what the attack itself generated with.

Tokens are written in prompts by name (``<adv>``, ``<adv-3>``...). A token holds ``k`` vectors per
text encoder (SDXL has two); a token found by a discrete search also records its vocabulary ids
(the vectors are then those rows of the embedding matrix, so the replay equals the ids).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapters import Encoded
from ..adapters.sampling import Hook, StepContext
from ..errors import InvalidInputError
from ..io import atomic_path

FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "adversarial.json", "adversarial.safetensors"
#: what a token name looks like in a prompt
TOKEN_RE = re.compile(r"<[A-Za-z0-9_*.:-]{1,40}>")
#: a concept-arithmetic term's stand-in for the prompt being generated
PROMPT_SLOT = "{prompt}"


def check_token_name(name: str) -> str:
    if not TOKEN_RE.fullmatch(name):
        raise InvalidInputError(f"token name {name!r} must look like <adv> (letters, digits, _*.:- in angle brackets)")
    return name


@dataclass
class Adversarial:
    """What an attack found, replayable on the model it was made on.

    Attributes:
        attack: the attack's registered name.
        tokens: token name -> one (k, d_tok) tensor per text encoder.
        token_ids: token name -> the k vocabulary ids, for tokens found by a discrete search.
        prompts: the attacked prompt of each attacked image (token names where the attack put them).
        seeds: the seed of each attacked image.
        terms: concept arithmetic's guidance terms ``(prompt, weight)`` (``{prompt}`` is the prompt being
            generated): the guided prediction becomes ``u + sum_i w_i (p_i - u)``; empty for other attacks.
        manifest: attack config, model family and fingerprint, the edits it attacked, the concept.
    """

    attack: str
    tokens: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    terms: list[tuple[str, float]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ conditioning
    def check(self, adapter: Any, force: bool = False) -> None:
        """Refuse a model of another family or base model (token vectors live in one model's space)."""
        fam, fp = self.manifest.get("family"), self.manifest.get("model_fingerprint")
        if fam and fam != adapter.family:
            raise InvalidInputError(f"this adversarial artefact was made on a {fam} model, not {adapter.family}; "
                                    "attack this model to make one for it")
        if fp and not force and fp != adapter.fingerprint():
            raise InvalidInputError("this adversarial artefact was made on another model (fingerprint "
                                    f"{fp[:12]}); attack this model to make one, or pass --force to try it anyway")
        dims = [te.get_input_embeddings().weight.shape[1] for te in adapter.text_encoders()]
        for name, vecs in self.tokens.items():
            if [v.shape[-1] for v in vecs] != dims:
                raise InvalidInputError(f"token {name} has vectors of width {[v.shape[-1] for v in vecs]} but this "
                                        f"model's text encoders take {dims}; it was made on another architecture")

    def encode(self, adapter: Any, prompts: Sequence[str]) -> Encoded:
        """Conditioning for ``prompts`` with this artefact's tokens put in where they are named,
        differentiable in the token vectors."""
        return encode_with_tokens(adapter, list(prompts), self.tokens)

    def hooks(self) -> list[Hook]:
        """The sampling hooks the artefact needs (concept arithmetic's composition; none otherwise)."""
        return [ArithmeticHook(self.terms)] if self.terms else []

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, overwrite: bool = False) -> None:
        """Write ``adversarial.json`` and ``adversarial.safetensors`` into ``folder``: a new folder is made
        atomically; in an existing one each file is written atomically, and an artefact already there is
        replaced only with ``overwrite``."""
        folder = Path(folder)
        if not folder.exists():
            from ..io import atomic_dir

            with atomic_dir(folder) as tmp:
                self.save(tmp)
            return
        if not overwrite and ((folder / JSON_NAME).exists() or (folder / TENSORS_NAME).exists()):
            raise InvalidInputError(f"{folder} already holds an adversarial artefact; choose another folder or pass "
                                    "overwrite=True")
        tensors = {f"{name}/{i}": v.detach().to("cpu").contiguous() for name, vecs in self.tokens.items()
                   for i, v in enumerate(vecs)}
        meta = {"format_version": FORMAT_VERSION, "attack": self.attack, "prompts": self.prompts, "seeds": self.seeds,
                "terms": [[p, w] for p, w in self.terms], "token_ids": self.token_ids,
                "tokens": {n: [list(v.shape) for v in vecs] for n, vecs in self.tokens.items()},
                "manifest": self.manifest}
        with atomic_path(folder / TENSORS_NAME) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(folder / JSON_NAME) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Adversarial":
        """Read an attack's run folder (or the folder holding its artefact)."""
        folder = Path(folder)
        meta_path = folder / JSON_NAME
        if not meta_path.is_file():
            raise InvalidInputError(f"{folder} holds no {JSON_NAME}; pass the run folder `erasekit attack -o` wrote")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(folder / TENSORS_NAME))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read the adversarial artefact in {folder} ({type(e).__name__}); "
                                    "run the attack again") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(f"{meta_path} is not an erasekit adversarial artefact of format {FORMAT_VERSION}")
        tokens = {n: [tensors[f"{n}/{i}"] for i in range(len(shapes))] for n, shapes in meta["tokens"].items()}
        return cls(meta["attack"], tokens, {k: list(v) for k, v in meta.get("token_ids", {}).items()},
                   list(meta["prompts"]), [int(s) for s in meta["seeds"]],
                   [(str(p), float(w)) for p, w in meta.get("terms", [])], dict(meta.get("manifest", {})))


# ---------------------------------------------------------------------- prompts with tokens
def _tokenize_piece(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids) if text.strip() else []


def token_sequences(adapter: Any, prompts: list[str], tokens: dict[str, list[torch.Tensor]]
                    ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per text encoder: (N, L) ids (placeholders hold a filler id) and (N, L, d) input embeddings with the
    named tokens' vectors in place. Without tokens in a prompt the ids are the tokenizer's own."""
    names = sorted(tokens, key=len, reverse=True)
    splitter = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None
    out_ids: list[list[torch.Tensor]] = []
    out_emb: list[list[torch.Tensor]] = []
    for e, (tok, te) in enumerate(adapter._text_pairs()):
        limit = tok.model_max_length
        table = te.get_input_embeddings()
        ids_rows, emb_rows = [], []
        for p in prompts:
            parts = splitter.split(p) if splitter else [p]
            ids: list[int] = [tok.bos_token_id]
            slots: list[tuple[int, torch.Tensor]] = []
            for part in parts:
                if splitter is not None and part in tokens:
                    vec = tokens[part][e]
                    slots.append((len(ids), vec))
                    ids.extend([_filler(tok)] * vec.shape[0])
                else:
                    ids.extend(_tokenize_piece(tok, part))
            if len(ids) + 1 > limit:
                raise InvalidInputError(f"{p[:60]!r} takes {len(ids) + 1} tokens with its adversarial tokens; the text "
                                        f"encoder reads {limit}: shorten the prompt or use fewer tokens")
            ids.append(tok.eos_token_id)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids.extend([pad] * (limit - len(ids)))
            row = torch.tensor(ids, dtype=torch.long, device=te.device)
            emb = table(row)
            if slots:
                pieces, at = [], 0
                for pos, vec in slots:
                    pieces += [emb[at:pos], vec.to(device=emb.device, dtype=emb.dtype)]
                    at = pos + vec.shape[0]
                emb = torch.cat(pieces + [emb[at:]])
            ids_rows.append(row)
            emb_rows.append(emb)
        out_ids.append(torch.stack(ids_rows))
        out_emb.append(torch.stack(emb_rows))
    return list(zip(out_ids, out_emb))  # type: ignore[arg-type]


def _filler(tok: Any) -> int:
    """An ordinary (not start, end or padding) id: it keeps the end-token position where it belongs."""
    return next(i for i in range(8) if i not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))


def encode_with_tokens(adapter: Any, prompts: list[str], tokens: dict[str, list[torch.Tensor]]) -> Encoded:
    """Encode ``prompts`` with the named tokens' vectors where they appear (differentiable in them)."""
    if not prompts:
        raise InvalidInputError("no prompt to encode")
    seq = token_sequences(adapter, prompts, tokens)
    return adapter.encode_embeddings([e for _, e in seq], [i for i, _ in seq])


def ids_to_vectors(adapter: Any, ids: Sequence[int]) -> list[torch.Tensor]:
    """The embedding rows of vocabulary ``ids`` in each text encoder: a token that replays those ids."""
    idx = torch.tensor(list(ids), dtype=torch.long)
    return [te.get_input_embeddings().weight.detach()[idx.to(te.device)].clone() for te in adapter.text_encoders()]


# ---------------------------------------------------------------------- concept arithmetic
class ArithmeticHook(Hook):
    """Guidance composed from several prompts: ``u + sum_i w_i (p_i - u)``, where ``p_i`` is the guided
    prediction of term i (hook edits underneath still act on each) and ``u`` the unconditional one.
    The term ``{prompt}`` is the prompt being generated; other terms are encoded once per call."""

    def __init__(self, terms: Sequence[tuple[str, float]]) -> None:
        self.terms = [(p, float(w)) for p, w in terms]
        self.encoded: dict[str, Encoded] = {}

    def embeddings(self, ctx: Any, cond: Encoded, uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        if uncond is None:
            raise InvalidInputError("concept arithmetic composes classifier-free guidance; sample with guidance > 1")
        others = [p for p, _ in self.terms if p != PROMPT_SLOT]
        if others:  # through the token path: a guard that reads tokens (SAFREE) guards each term as a prompt
            enc = encode_with_tokens(ctx.adapter, others, {})
            self.encoded = {p: enc.index([i] * len(cond)) for i, p in enumerate(others)}
        return cond, uncond

    def noise(self, ctx: StepContext, predict: Callable[..., torch.Tensor]) -> torch.Tensor:
        u = predict(cond=ctx.uncond)
        out = u.clone()
        for p, w in self.terms:
            guided = predict() if p == PROMPT_SLOT else predict(cond=self.encoded[p])
            out = out + w * (guided - u)
        return out
