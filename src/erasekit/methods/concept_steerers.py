"""Concept Steerers (Kim et al., 2025): steer the text encoder's residual stream with a k-sparse
autoencoder's reconstruction of the concept (METHODS.md §4.2). A ``hook`` edit: no weight changes.

Fit. ``H_c`` (L, d) is the output of the text-encoder layer ``site`` at every position (start, words,
end, padding) when the concept's prompt is encoded. The steering direction is the SAE's decoding of
its dense code, without the decoder bias: ``V = W_dec ReLU(W_enc (H_c - b_dec) + b_enc)`` (``encode_without_topk``
in the official code), in the layer's own units, summed over the erased concepts. The edit carries
``V`` and names the SAE it came from by digest (``hook.sae_digest``).

Generation. The prompts are encoded with ``H <- H - strength * V`` added at that layer (row-aligned,
every position) and the unconditional prompt with ``H <- H + strength * V``; so the gap between the
conditional and unconditional branch loses ``2 strength V`` of the concept, which classifier-free
guidance then scales. ``strength`` is the official ``--strength`` with the sign turned: the official
erasure runs use ``--strength -1``, which is ``strength=1`` here, and a negative strength (which would
add the concept) is refused.

Order. The official hook decides the sign by counting calls of the layer (the first is the prompt,
the later ones the negative prompt), which silently breaks when a pipeline encodes in another order
or encodes more than twice. Ours encodes the prompts and the unconditional prompt in separate calls,
each with its own sign, so the order in which anything calls the text encoder does not matter.

Composition. When the conditioning reaching this hook is still the plain encoding of the prompts
(and the unconditional one the pipeline's own), it is replaced by the steered encoding; when an
earlier hook edit changed it (another guard's negative prompt, say), the steering's difference is
added to what it made instead. An unconditional branch the text encoder never made (SDXL's zeros for
an empty negative prompt) is left as it is, as the official rule never reaches it.

The SAE: ``sae=DIR`` uses one from ``erasekit sae train --site text-encoder-layer-N`` (checked against
this model's fingerprint; it brings its site). Without it, ``fit`` trains one on the text encoder's
activations for the fit's own prompts (the concept, neighbour and preserve phrases through
``templates``), which is quick but sees few prompts; an SAE trained on a broad prompt set is better.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..adapters import Encoded
from ..adapters.sampling import Hook, SampleContext, resolve_module
from ..concepts import ConceptSpec
from ..edits import Edit, HookEdit
from ..errors import InvalidInputError
from ..sae import SAEConfig, TopKSAE, collect_text, is_text_site, load_record
from ..sae import fit as fit_sae
from .base import Method, config_dict
from .closed_form import expand

#: Concept Steerers on the embedded world model (4-layer, 128-d text encoder, guidance 2). Chosen on
#: "star" against 16 star and 28 other-shape captions (seeds 100-143), with the SAE trained at fit time:
#: layer 1 at strength 4 takes star detection to 0.06 and keeps 0.43 of the other shapes (0.63 of their
#: colour, texture and background); strength 3: 0.31 / 0.61 / 0.85; the default layer 2 is no better.
#: Nothing is specific: the steering vector of "star" has cosine 0.87 with that of the empty prompt (an
#: SAE from `sae train` on 2000 captions gives the same), so it mostly moves every prompt. Its size also
#: depends on how long the SAE trained (norm 80 after 600 steps, 50 after 3000: the dense code shrinks),
#: so a strength is tied to the SAE it was chosen with. Re-chosen on the shipped broad-grammar model by
#: the rule of ``UCE_WORLD`` (highest mean templated H over star, heart and circle, seeds 100-115;
#: ``world_erasure.py`` on a CPU, the SAE trained at fit time): strength 4 / 3 / 2 gave H 0.582 / 0.614 /
#: 0.539 (paraphrases 0.598 / 0.670 / 0.577), so 3; it keeps half the other shapes (0.46 at 3, 0.31 at 4).
STEERERS_WORLD: dict[str, object] = {"site": "text-encoder-layer-1", "strength": 3.0}


@dataclass(frozen=True)
class ConceptSteerersConfig:
    sae: str = field(default="", metadata={
        "help": "folder of an SAE from `erasekit sae train --site text-encoder-layer-N` on this model; empty: train "
                "one at fit time on the fit prompts' activations at `site` (settings sae_*)"})
    site: str = field(default="", metadata={
        "help": "text-encoder layer an SAE trained at fit time reads (e.g. text-encoder-layer-9, the official site on "
                "SD1.x); empty: the layer at three quarters of the first text encoder's depth but not its last (9 of "
                "CLIP-L's 12, 2 of the world's 4)"})
    strength: float = field(default=1.0, metadata={
        "help": "lambda: the prompt's layer output loses lambda * V, the unconditional one gains it (official "
                "--strength -1 is 1 here); at least 0"})
    template: str = field(default="{}", metadata={
        "help": "how the concept is written into the steering prompt ({} = phrase; the official runs use the bare "
                "word, e.g. 'nudity')", "each_contains": "{}"})
    synonyms: bool = field(default=False, metadata={
        "help": "steer with the mean of the concept's phrases' vectors (target and synonyms) instead of the target's"})
    templates: tuple[str, ...] = field(default=("{}", "a photo of a {}", "an image of a {}", "a picture of a {}"), metadata={
        "help": "prompt templates of the fit prompts an SAE trained at fit time sees ({} = phrase)",
        "min_items": 1, "each_contains": "{}"})
    seed: int = field(default=0, metadata={"help": "seed of an SAE trained at fit time"})
    sae_latents: int = field(default=1024, metadata={"help": "width of an SAE trained at fit time", "min": 1})
    sae_k: int = field(default=16, metadata={"help": "k of an SAE trained at fit time", "min": 1})
    sae_steps: int = field(default=3000, metadata={"help": "optimiser steps of an SAE trained at fit time", "min": 1})


def default_site(adapter: Any) -> str:
    """The role name of the first text encoder's layer at three quarters of its depth, and not its last (the
    official layer 9 of CLIP-L's 12; SDXL reads the penultimate layer's output, which the last never reaches)."""
    layers = [s for s in adapter.sites() if s.startswith("text-encoder-layer-")]
    if not layers:
        raise InvalidInputError("concept-steerers steers a text-encoder layer, and this pipeline's text encoder has "
                                "none erasekit can name; pass --set site=component.module.path")
    return f"text-encoder-layer-{max(min(round(0.75 * len(layers)), len(layers) - 2), 0)}"


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _added(out: Any, vec: torch.Tensor) -> Any:
    """The layer's output (a tensor or a tuple whose first item is it) plus ``vec`` (L, d), row-aligned."""
    x = _tensor(out)
    if x.shape[-2:] != vec.shape:
        raise InvalidInputError(f"the steering vector has shape {tuple(vec.shape)} but the text-encoder layer gives "
                                f"{tuple(x.shape[-2:])} per prompt; fit the edit on this model")
    new = x + vec.to(device=x.device, dtype=x.dtype)
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def steered(adapter: Any, site: str, vec: torch.Tensor) -> Iterator[None]:
    """Within the block, the text-encoder module ``site`` outputs its output plus ``vec``. The hook runs before
    any other forward hook of the module (transformers 5 records ``hidden_states`` with one), so every reader
    of the layer's output sees the steered one."""
    handle = resolve_module(adapter.pipe, site).register_forward_hook(lambda m, a, out: _added(out, vec), prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_output(adapter: Any, site: str, prompt: str) -> torch.Tensor:
    """(L, d) output of the text-encoder module ``site`` at every position while ``prompt`` is encoded."""
    got: list[torch.Tensor] = []
    handle = resolve_module(adapter.pipe, site).register_forward_hook(lambda m, a, out: got.append(_tensor(out)))
    try:
        adapter.encode([prompt], unique=False)
    finally:
        handle.remove()
    if not got:
        raise InvalidInputError(f"{site!r} never ran while the text encoder encoded; choose a text-encoder layer")
    return got[0][0].detach().float().cpu()


def steering_direction(sae: TopKSAE, h: torch.Tensor) -> torch.Tensor:
    """``W_dec ReLU(W_enc (H - b_dec) + b_enc)`` for each row of ``h`` (L, d): the dense (no top-k) code
    decoded without the decoder bias, in the input's units."""
    with torch.no_grad():
        return (sae.pre_acts(h.float()) @ sae.W_dec / sae.scale).cpu()


def _same(a: Encoded, b: Encoded) -> bool:
    return torch.equal(a.embeds, b.embeds) and (a.pooled is None) == (b.pooled is None) and \
        (a.pooled is None or torch.equal(a.pooled, b.pooled))


def _plus(base: Encoded, new: Encoded, old: Encoded) -> Encoded:
    """``base + (new - old)``, embeddings and pooled."""
    pooled = None if base.pooled is None or new.pooled is None or old.pooled is None else \
        base.pooled + (new.pooled - old.pooled)
    return Encoded(base.embeds + (new.embeds - old.embeds), base.lengths, pooled)


class SteerHook(Hook):
    """Re-encodes the prompts with ``-vec`` and the unconditional prompt with ``+vec`` at the layer."""

    def __init__(self, site: str, vec: torch.Tensor) -> None:
        self.site, self.vec = site, vec

    def embeddings(self, ctx: SampleContext, cond: Encoded, uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        if ctx.prompts is None and cond.inputs is None:
            raise InvalidInputError("concept-steerers re-encodes the prompt's tokens with its steering vector; generate "
                                    "from prompts, or from embeddings made by encode_embeddings (they carry their tokens)")
        adapter, n = ctx.adapter, len(cond)
        with torch.no_grad():
            if ctx.prompts is not None:
                with steered(adapter, self.site, -self.vec):
                    cond_s = adapter.encode(list(ctx.prompts), unique=False)
                plain = adapter.encode(list(ctx.prompts), unique=False)
                cond = cond_s if _same(cond, plain) else _plus(cond, cond_s, plain)
            else:  # an attack's token vectors: re-encode what the text encoders read; the difference is added to
                # the conditioning, so an attack's gradient still reaches its vectors
                embeds, ids = [e.detach() for e, _ in cond.inputs], [i for _, i in cond.inputs]  # type: ignore[union-attr]
                with steered(adapter, self.site, -self.vec):
                    cond_s = adapter.encode_embeddings(embeds, ids)
                plain = adapter.encode_embeddings(embeds, ids)
        if ctx.prompts is None:
            cond = _plus(cond, cond_s, plain)
        with torch.no_grad():
            if uncond is None:
                return cond, None
            empty = adapter.encode([""] * n, unique=False)
            if not torch.equal(uncond.embeds, empty.embeds) and _same(uncond, adapter.uncond(n)):
                return cond, uncond  # the pipeline's own unconditional branch is not the text encoder's (SDXL zeros)
            with steered(adapter, self.site, self.vec):
                uncond_s = adapter.encode([""] * n, unique=False)
        return cond, uncond_s if _same(uncond, empty) else _plus(uncond, uncond_s, empty)


class ConceptSteerers(Method):
    name = "concept-steerers"
    family = "sae"
    edit_kind = "hook"
    description = ("Concept Steerers: subtract a text-encoder SAE's reconstruction of the concept from the prompt's "
                   "residual stream and add it to the unconditional one (a hook edit)")
    Config = ConceptSteerersConfig

    def uses_keep_phrases(self) -> bool:
        return not self.config.sae  # they are among the prompts its own SAE is trained on; a given SAE reads none

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if self.config.strength < 0:
            raise InvalidInputError(f"setting strength={self.config.strength!r} must be positive: the concept's vector "
                                    "is subtracted from the prompt (the official --strength -1 is strength=1); a "
                                    "negative one would add the concept")
        if self.config.sae_k > self.config.sae_latents:
            raise InvalidInputError(f"setting sae_k={self.config.sae_k} is out of range: it must be at most "
                                    f"sae_latents={self.config.sae_latents}")

    def steering_prompts(self, concepts: list[ConceptSpec]) -> list[list[str]]:
        cfg = self.config
        return [[" ".join(cfg.template.replace("{}", p).split()) for p in (c.erase_phrases if cfg.synonyms
                                                                             else (c.target,))] for c in concepts]

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:
        t0 = time.perf_counter()
        cfg = self.config
        if not hasattr(adapter, "sites"):
            raise InvalidInputError(f"concept-steerers steers a text-encoder layer; the {adapter.family!r} family "
                                    "does not name them")
        steer = self.steering_prompts(concepts)
        adapter.check_length([p for ps in steer for p in ps])
        record: dict[str, Any] | None
        if cfg.sae:
            sae = TopKSAE.load(cfg.sae)
            module = str(sae.meta.get("site") or adapter.site(cfg.site or default_site(adapter)))
            record, source = load_record(cfg.sae), str(cfg.sae)
        else:
            module = adapter.site(cfg.site or default_site(adapter))
            sae = None
        if not is_text_site(adapter, module):
            raise InvalidInputError(f"concept-steerers steers a text-encoder layer, but {module!r} is not in a text "
                                    "encoder; use an SAE trained at --site text-encoder-layer-N")
        adapter.site(module)  # it exists on this pipeline
        if sae is not None:
            sae.check_for(adapter, None)
        else:
            phrases = dict.fromkeys(p for c in concepts for p in (*c.erase_phrases, *c.keep_phrases, c.anchor))
            prompts = list(dict.fromkeys(q for p in phrases for q in expand(cfg.templates, p)))
            acts = collect_text(adapter, module, prompts)
            sae_cfg = SAEConfig(n_latents=cfg.sae_latents, k=cfg.sae_k, steps=cfg.sae_steps, seed=cfg.seed)
            meta = {"site": module, "site_name": cfg.site or default_site(adapter),
                    "model_fingerprint": adapter.fingerprint(), "family": adapter.family, "prompts": len(prompts),
                    "trained_by": "concept-steerers fit"}
            sae, record = fit_sae(acts.x, sae_cfg, meta)
            source = "trained at fit"
        vec = torch.zeros(())
        for prompts in steer:
            hs = [layer_output(adapter, module, p) for p in prompts]
            if hs[0].shape[-1] != sae.d_in:
                raise InvalidInputError(f"the SAE takes {sae.d_in}-channel activations but {module} gives "
                                        f"{hs[0].shape[-1]}; train an SAE at this site of this model")
            vec = vec + torch.stack([steering_direction(sae, h) for h in hs]).mean(0)
        summary = {k: record[k] for k in ("fve", "dead_fraction", "l0", "steps", "tokens") if record and k in record}
        return HookEdit({"direction": vec.contiguous()}, {
            "method": self.name, "config": config_dict(cfg), "concepts": [c.to_dict() for c in concepts],
            "family": adapter.family, "base_fingerprint": adapter.fingerprint(),  # its tensors are this model's
            "hook": {"site": module, "steering_prompts": steer, "sae_digest": sae.digest(), "sae_source": source,
                     "sae_config": sae.config(), "sae_record": summary},
            "direction_norm": float(vec.norm()), "erasekit_version": __version__,
            "wall_time_s": round(time.perf_counter() - t0, 4)})

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """On the embedded world: ``STEERERS_WORLD`` and the world's erase templates for the concepts' axis."""
        from ..world.vocab import erase_templates, find_axis

        axes = {found[0] for c in concepts if (found := find_axis(c.target)) is not None}
        return {**({"templates": erase_templates(axes.pop())} if len(axes) == 1 else {}), **STEERERS_WORLD}

    @classmethod
    def make_hooks(cls, edit: Edit, adapter: Any) -> list[Hook]:
        strength = float(edit.manifest["config"].get("strength", 1.0))
        return [SteerHook(str(edit.manifest["hook"]["site"]), strength * edit.tensors()["direction"].float())]

