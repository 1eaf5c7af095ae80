"""SAFREE (Yoon et al., ICLR 2025): training-free safe generation by projecting the prompt's
trigger tokens away from a toxic subspace (METHODS.md §3.3). A ``hook`` edit: no weight changes.

What the official code does (github.com/jaehong31/SAFREE, HEAD b8b2c3f; paths below are in that
repository) and what this file does:

- **Toxic subspace.** ``C`` = the pooled embeddings of the toxic keywords (here: each concept's
  target and synonyms, plus ``keywords``), ``P_C = C^T (C C^T)^+ C``
  (models/modified_stable_diffusion_pipeline.py ``projection_matrix``, ``_new_encode_negative_prompt_space``).
  "Pooled" is the cross-attention row at the end token: on SD1.x that is exactly CLIP's
  ``pooler_output`` (final layer norm at EOT), which the official code uses. ``C`` is computed at
  fit time and carried by the edit (tensor ``concept_embeds``).
- **Trigger tokens.** ``e_i`` = pooled embedding of the prompt with real token i replaced by id 0;
  ``d_i = ||(I - P_C) e_i||``; token i is a trigger unless ``d_i < (1 + alpha) * mean_{j != i} d_j``
  (``safree_projection``; ``_masked_encode_prompt``). A prompt with one real token has an empty mean
  (NaN): the official comparison then marks that token a trigger, and so does this one.
- **Projection.** ``P_M`` projects onto span{e_1..e_n}; trigger rows x of the conditional sequence
  become ``(I - P_C) P_M x``; every other row (start, end, padding, other tokens) and the
  unconditional branch are left exactly as they are.
- **Self-validating filter (SVF).** ``beta = 1 - mean cos(x, (I - P_C) P_M x)`` over the prompt's
  active rows (start to end token), ``t' = round(up_t * sigmoid(2 k (10 beta - t0)))``; steps with
  0-based index ``i <= t'`` use the projected conditioning, later steps the original (``f_beta``,
  the denoising loop of ``ModifiedStableDiffusionPipeline.__call__``). Without SVF every step is
  projected (the official ``--re_attn_t`` default ``-1,1001`` covers every step).
- **Negative prompt.** generate_safree.py passes the keywords joined by ", " as the negative prompt
  of every run (lines 258, 299, 319); ``negative_prompt`` (default on) does the same.
- **Latent re-attention (LRA).** Optional (``lra``, default off). When on, each step runs a third
  UNet branch with the original prompt, and on the skip features that feed the first two decoder
  stages the guarded branch's lowest frequencies (the 2x2 block around DC after fftshift,
  threshold 1) are kept where the original branch's real part exceeds them and replaced by the
  constant ``lra_s1``/``lra_s2`` elsewhere (free_lunch_utils.py ``SafeGuard_Low_Fourier_filter``,
  lines 21-47). After the SVF steps the guarded branch equals the original one, so that rule
  replaces the block by the constant on every later step, as the official filter would.

Constants verified in the official code:

- alpha: ``--sf_alpha`` default 0.01 (generate_safree.py:415); ``safree_projection(..., alpha=0.)``
  is only the function's own default (models/modified_stable_diffusion_pipeline.py:58).
- SVF: ``--up_t`` 10 (generate_safree.py:418); ``f_beta`` k = 2.5, t0 = 5.333 (k = 3.5, t0 = 5.5 for
  "artists-" categories), sigmoid scale 2.0, ``round(up_t * sigmoid(...))``
  (modified_stable_diffusion_pipeline.py:19-36); projected while ``i <= t'`` (line 515). The SD1.4
  scripts pass ``--safree -svf -lra`` (scripts/run_nudity.sh, run_coco.sh, run_artist.sh); the SDXL
  scripts pass ``--safree`` only.
- LRA: ``--freeu_hyp`` "1.0-1.0-0.9-0.2" = b1 1.0, b2 1.0 (backbone factors: identity), s1 0.9,
  s2 0.2 (generate_safree.py:417); threshold 1 (free_lunch_utils.py:172,175,330,333); s1 where the
  decoder's hidden state has 1280 channels, s2 where it has 640.
- But generate_safree.py:227-228 registers the blocks without ``safree=``, whose default None
  (free_lunch_utils.py:151,299) falls to ``else: NotImplementedError(...)``, an exception built and
  never raised (lines 186, 344): the Fourier filter never runs. With ``-lra`` the official pipeline
  only adds a third batch row that is discarded (modified_stable_diffusion_pipeline.py:506-533), so
  the published runs had no effective LRA: ``lra=False`` reproduces them at 2/3 of the UNet cost.
- Our LRA ranks decoder stages as diffusers' FreeU does (up_blocks.0 -> s1, up_blocks.1 -> s2)
  instead of by SD's channel counts, which the world model (64/128 channels) never has.

SDXL: the cross-attention input is the concatenation of both encoders' penultimate hidden states
(768 + 1280 on SDXL-base); the subspace, the masked embeddings and the projection all live in that
concatenated space (the "pooled" vector is its end-token row). The pooled ``add_embeds`` are left
unchanged, as the official SDXL pipeline leaves ``add_text_embeds``. (The official SDXL code builds
both subspaces from text_encoder_2's *projected* text embeddings and projects only the 1280-d hidden
half with them, mixing two spaces; it also runs without SVF.)

On projected SVF steps the noise hook asks the inner prediction for the projected conditioning
(``predict(cond=...)``), so noise hooks of edits applied *before* SAFREE (inner hooks, SLD say) act
on those steps too. With LRA it runs its own three-branch UNet call on every step, and inner noise
hooks do not act (a limitation). The negative prompt replaces the unconditional conditioning, so
stacked with another guard that does the same (negative-prompt), the outer one's wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..adapters import Encoded
from ..adapters.sampling import Hook, SampleContext, StepContext
from ..concepts import ConceptSpec
from ..edits import Edit, HookEdit
from ..errors import InvalidInputError
from .base import Method, config_dict, config_from_dict

#: SAFREE's settings for the embedded world model: a higher trigger threshold. Measured on the shipped
#: world model erasing "star" (``erasekit.evaluate(pipe, "star", patch=edit, seeds=range(16))``; 20 steps,
#: guidance 2): the official defaults take star detection 1.00 -> 0.06 but neighbour shapes 1.00 -> 0.44,
#: unrelated axes 1.00 -> 0.83 and collateral 0.99 -> 0.74: at alpha 0.01 about half of every prompt's
#: tokens are triggers on the world's 128-d encoder, and projecting them wipes them. alpha 0.05:
#: star 0.19, neighbours 0.75, unrelated 1.00, collateral 0.88; alpha 0.1 catches almost no "star"
#: token (star 0.88). Shortening SVF (up_t 4 = 10/50 of 20 steps) kept star at 0.56-0.62. That was the
#: 7-template model. On the shipped broad-grammar model, by one rule fixed before the run (highest mean
#: templated H over star, heart and circle on seeds 100-115, disjoint from the tables' 0-31;
#: benchmarks/world_erasure.py on an H200): alpha 0.05 / 0.03 / 0.02 gave H 0.307 / 0.411 / 0.584
#: (paraphrases 0.236 / 0.442 / 0.505), so 0.02.
SAFREE_WORLD: dict[str, object] = {"alpha": 0.02}


@dataclass(frozen=True)
class SafreeConfig:
    alpha: float = field(default=0.01, metadata={
        "help": "trigger threshold: token i is a trigger when removing it puts the prompt at least (1+alpha) times "
                "the mean of the other tokens' distances from the toxic subspace (official --sf_alpha default 0.01)",
        "min": 0.0})
    keywords: tuple[str, ...] = field(default=(), metadata={
        "help": "extra toxic keywords spanning the subspace, beside each concept's target and synonyms "
                "(the official nudity run uses 17, e.g. 'Nudity|Pornography|Erotic Art')"})
    svf: bool = field(default=True, metadata={
        "help": "self-validating filter: project only for the first t' steps, t' from the prompt's cosine to its "
                "projection (the official SD scripts pass -svf); off: project at every step"})
    up_t: int = field(default=10, metadata={"help": "SVF's upper bound on t', in steps (official --up_t 10)",
                                            "min": 0})
    svf_k: float = field(default=2.5, metadata={"help": "SVF sigmoid steepness k (official 2.5; 3.5 for artists)",
                                                "above": 0.0})
    svf_midpoint: float = field(default=5.333, metadata={
        "help": "SVF sigmoid midpoint t0 on 10*beta (official 5.333; 5.5 for artists)"})
    negative_prompt: bool = field(default=True, metadata={
        "help": "also guide away from the keywords joined by ', ' as negative prompt, as the official script does on "
                "every run"})
    lra: bool = field(default=False, metadata={
        "help": "latent re-attention: a third UNet branch with the original prompt and a Fourier filter on the "
                "guarded branch's skip features of the first two decoder stages (SD-style UNets; costs 1.5x)"})
    lra_s1: float = field(default=0.9, metadata={"help": "LRA constant for the first decoder stage (official 0.9)",
                                                 "min": 0.0})
    lra_s2: float = field(default=0.2, metadata={"help": "LRA constant for the second decoder stage (official 0.2)",
                                                 "min": 0.0})


# ---------------------------------------------------------------------- maths (float64, testable)
def projector(rows: torch.Tensor) -> torch.Tensor:
    """(d, d) orthogonal projector onto the span of ``rows`` (k, d): ``E^T (E E^T)^+ E``."""
    e = rows.to(torch.float64)
    if len(e) == 0:
        return torch.zeros(e.shape[-1], e.shape[-1], dtype=torch.float64, device=e.device)
    return e.T @ torch.linalg.pinv(e @ e.T) @ e


def triggers(masked: torch.Tensor, p_toxic: torch.Tensor, alpha: float) -> torch.Tensor:
    """(n,) bool: which of the n real tokens are triggers, from ``masked`` (n, d) = pooled embeddings of
    the prompt with each token removed in turn."""
    n = len(masked)
    q = torch.eye(p_toxic.shape[0], dtype=torch.float64, device=masked.device) - p_toxic
    d = (masked.to(torch.float64) @ q).norm(dim=-1)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=masked.device)
    mean_others = (d.sum() - d) / (n - 1) if n > 1 else torch.full_like(d, float("nan"))
    return ~(d < (1.0 + alpha) * mean_others)  # NaN (one token) -> trigger, as the official comparison


def project_rows(x: torch.Tensor, masked: torch.Tensor, p_toxic: torch.Tensor) -> torch.Tensor:
    """``(I - P_C) P_M x`` for every row of ``x`` (L, d), in float64."""
    q = torch.eye(p_toxic.shape[0], dtype=torch.float64, device=x.device) - p_toxic
    return x.to(torch.float64) @ projector(masked) @ q  # both projectors are symmetric


def svf_steps(beta: float, up_t: int, k: float, midpoint: float) -> int:
    """SVF: ``round(up_t * sigmoid(2 k (10 beta - t0)))``; steps with index ``<= t'`` are projected."""
    z = 2.0 * k * (10.0 * beta - midpoint)
    sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return round(up_t * sig)


@dataclass
class Projected:
    """One prompt's SAFREE result: the new conditioning rows, the trigger mask and the SVF step bound."""

    rows: torch.Tensor          # (L, d) conditioning with trigger rows projected
    trigger: torch.Tensor       # (n,) bool over real tokens 1..n
    beta: float
    steps: int                  # t'


def safree_rows(x: torch.Tensor, length: int, masked: torch.Tensor, p_toxic: torch.Tensor,
                cfg: SafreeConfig) -> Projected:
    """SAFREE for one prompt: ``x`` (L, d) its conditioning, ``length`` its active rows (start..end token),
    ``masked`` (n, d) its token-removed pooled embeddings."""
    n = len(masked)
    trig = triggers(masked, p_toxic, cfg.alpha)
    proj = project_rows(x[:length], masked, p_toxic)
    rows_mask = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    rows_mask[1:n + 1] = trig
    out = x.clone()
    out[:length] = torch.where(rows_mask[:length, None], proj.to(x.dtype), x[:length])
    cos = torch.nn.functional.cosine_similarity(proj, x[:length].to(torch.float64), dim=-1)
    beta = float(1.0 - cos.mean().detach())  # a number (steps), never part of a graph an attack differentiates
    return Projected(out, trig, beta, svf_steps(beta, cfg.up_t, cfg.svf_k, cfg.svf_midpoint))


# ---------------------------------------------------------------------- encoder access
def pooled(enc: Encoded) -> torch.Tensor:
    """(N, d) end-token rows of the cross-attention input (CLIP's pooled output on SD1.x)."""
    idx = (enc.lengths - 1).clamp(min=0).to(enc.embeds.device)
    return enc.embeds[torch.arange(len(enc), device=enc.embeds.device), idx]


@torch.no_grad()
def masked_pooled(adapter: Any, prompt: str, length: int) -> torch.Tensor:
    """(n, d) pooled embeddings of ``prompt`` (``length`` active rows: start token, n real tokens, end
    token) with each real token in turn replaced by id 0, in every text encoder at once."""
    n = max(length - 2, 0)
    rows = []
    for i in adapter.input_ids([prompt]):
        r = i.repeat(max(n, 1), 1)
        r[torch.arange(n), torch.arange(1, n + 1)] = 0
        rows.append(r)
    embeds = [te.get_input_embeddings()(r.to(te.device)) for r, te in zip(rows, adapter.text_encoders())]
    return pooled(adapter.encode_embeddings(embeds, rows))[:n]


def masked_pooled_inputs(adapter: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> torch.Tensor:
    """:func:`masked_pooled` of one prompt given as what the text encoders read ((L, d_tok) token embeddings and
    (L,) ids per encoder, as ``Encoded.inputs`` holds them): each real token in turn becomes id 0."""
    n = max(length - 2, 0)
    embeds, rows = [], []
    for (e, ids), te in zip(inputs, adapter.text_encoders()):
        r = ids.repeat(max(n, 1), 1)
        m = e.repeat(max(n, 1), 1, 1).clone()
        zero = te.get_input_embeddings().weight[0].to(m)
        r[torch.arange(n), torch.arange(1, n + 1)] = 0
        m[torch.arange(n), torch.arange(1, n + 1)] = zero
        rows.append(r)
        embeds.append(m)
    return pooled(adapter.encode_embeddings(embeds, rows))[:n]


# ---------------------------------------------------------------------- hooks
def _lra_filter(h: torch.Tensor, guarded: slice, original: slice, scale: float) -> torch.Tensor:
    """SafeGuard_Low_Fourier_filter (threshold 1) on the guarded rows of skip features ``h`` (B, C, H, W)."""
    hh, ww = h.shape[-2:]
    if hh < 2 or ww < 2:
        return h
    f = torch.fft.fftshift(torch.fft.fftn(h.float(), dim=(-2, -1)), dim=(-2, -1))
    cr, cc = hh // 2, ww // 2
    block = (slice(None), slice(cr - 1, cr + 1), slice(cc - 1, cc + 1))
    low_g, low_o = f[guarded][(slice(None), *block)], f[original][(slice(None), *block)]
    keep = (low_o - low_g).real > 0
    f = f.clone()
    f[(guarded, *block)] = torch.where(keep, low_g, torch.full_like(low_g, scale))
    out = torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(h.dtype)


def lra_skip_map(unet: Any, s1: float, s2: float) -> dict[int, dict[int, float]]:
    """For an SD-style ``UNet2DConditionModel`` (``down_blocks``/``up_blocks`` with ``resnets`` and optional
    ``downsamplers``/``upsamplers``): per down block index, which entries of its skip-feature tuple feed
    decoder stage 0 (constant s1) or 1 (s2), as diffusers' FreeU ranks decoder stages."""
    owner: list[tuple[int, int]] = [(-1, 0)]  # conv_in output
    for j, block in enumerate(unet.down_blocks):
        count = len(block.resnets) + (1 if getattr(block, "downsamplers", None) is not None else 0)
        owner += [(j, k) for k in range(count)]
    out: dict[int, dict[int, float]] = {}
    for u, block in enumerate(unet.up_blocks):
        for _ in range(len(block.resnets)):
            j, k = owner.pop()
            if u < 2 and j >= 0:
                out.setdefault(j, {})[k] = (s1, s2)[u]
    return out


class SafreeHook(Hook):
    def __init__(self, p_toxic: torch.Tensor, cfg: SafreeConfig, negative: str) -> None:
        self.p_toxic, self.cfg, self.negative = p_toxic, cfg, negative
        self.original: Encoded | None = None
        self.projected: Encoded | None = None
        self.steps: torch.Tensor | None = None  # (N,) t' per row
        self.info: list[Projected] = []
        self._lra_rows: tuple[slice, slice] | None = None
        #: other conditioning outer hooks asked for, by id: (original, projected, SVF steps)
        self.others: dict[int, tuple[Encoded, Encoded, torch.Tensor]] = {}

    # ------------------------------------------------------------------ conditioning
    def embeddings(self, ctx: SampleContext, cond: Encoded, uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        if ctx.prompts is None and cond.inputs is None:
            raise InvalidInputError("safree finds trigger tokens from the prompt's tokens; generate from prompts, "
                                    "or from embeddings made by encode_embeddings (they carry their tokens)")
        self.original = cond
        self.projected, self.steps, self.info = self._project(ctx.adapter, cond, ctx.prompts)
        adapter = ctx.adapter
        if uncond is not None and self.cfg.negative_prompt:
            uncond = adapter.encode([self.negative]).index([0] * len(cond))
        if self.cfg.svf or self.cfg.lra:
            return cond, uncond  # the noise hook picks the conditioning per step
        return self.projected, uncond

    def _project(self, adapter: Any, cond: Encoded, prompts: list[str] | None
                 ) -> tuple[Encoded, torch.Tensor, list[Projected]]:
        """The projected conditioning of ``cond`` (read from ``prompts``, or from the tokens it carries), the
        SVF step t' per row and each row's record."""
        if self.p_toxic.shape[0] != cond.embeds.shape[-1]:
            raise InvalidInputError(f"this safree edit's subspace has width {self.p_toxic.shape[0]} but the pipeline's "
                                    f"text conditioning has width {cond.embeds.shape[-1]}; fit it on this model")
        p_toxic = self.p_toxic.to(adapter.device)
        cache: dict[tuple[str, int], torch.Tensor] = {}
        rows, info = [], []
        for i in range(len(cond)):
            length = int(cond.lengths[i])
            if prompts is not None:
                prompt = prompts[i]
                if (prompt, length) not in cache:
                    cache[(prompt, length)] = masked_pooled(adapter, prompt, length)
                masked = cache[(prompt, length)]
            else:  # adversarial token vectors: mask the rows the text encoders read
                masked = masked_pooled_inputs(adapter, [(e[i], ids[i]) for e, ids in cond.inputs], length)  # type: ignore[union-attr]
            res = safree_rows(cond.embeds[i], length, masked, p_toxic, self.cfg)
            info.append(res)
            rows.append(res.rows)
        return Encoded(torch.stack(rows), cond.lengths, cond.pooled), torch.tensor([r.steps for r in info]), info

    def guarded(self, index: int, original: Encoded | None = None, projected: Encoded | None = None,
                steps: torch.Tensor | None = None) -> Encoded | None:
        """The conditioning SAFREE guides with at step ``index`` (None: the original, nothing to do); of the
        sampled prompts, or of ``original`` with its ``projected`` conditioning and SVF ``steps``."""
        original = self.original if original is None else original
        projected = self.projected if projected is None else projected
        steps = self.steps if steps is None else steps
        assert original is not None and projected is not None and steps is not None
        if not self.cfg.svf:
            return projected
        use = (index <= steps).to(original.embeds.device)
        if not bool(use.any()):
            return None
        embeds = torch.where(use[:, None, None], projected.embeds, original.embeds)
        return Encoded(embeds, original.lengths, original.pooled)

    def _foreign(self, adapter: Any, cond: Encoded) -> tuple[Encoded, Encoded, torch.Tensor]:
        """Other conditioning an outer hook asks for (concept arithmetic's terms): guarded as a prompt is,
        from the tokens it carries; projected once per sampling call."""
        key = id(cond)
        if key not in self.others:
            projected, steps, _ = self._project(adapter, cond, None)
            self.others[key] = (cond, projected, steps)
        return self.others[key]

    # ------------------------------------------------------------------ denoising
    def noise(self, ctx: StepContext, predict: Callable[..., torch.Tensor]) -> torch.Tensor:
        if ctx.cond is ctx.uncond:  # an outer hook asks for the unconditional prediction: nothing to guard
            return predict()
        # other conditioning an outer hook asks for (concept arithmetic's terms), with the tokens to guard it by;
        # conditioning without tokens (a later embedding hook's transform of the prompts) gets the prompts' guard
        foreign = ctx.cond is not self.original and ctx.cond is not self.projected and ctx.cond.inputs is not None
        original, projected, steps = self._foreign(ctx.sample.adapter, ctx.cond) if foreign else \
            (self.original, self.projected, self.steps)
        if not (self.cfg.svf or self.cfg.lra):
            # the prompts' projected conditioning went in through `embeddings`; another one is projected here
            return predict(cond=projected) if foreign else predict()
        cond = self.guarded(ctx.index, original, projected, steps)
        if cond is None and not self.cfg.lra:
            return predict(cond=original) if foreign else predict()
        if cond is None:
            cond = original
        if not self.cfg.lra:
            return predict(cond=cond)  # inner noise hooks (SLD, say) run on the projected conditioning too
        adapter = ctx.sample.adapter
        x = adapter.pipe.scheduler.scale_model_input(ctx.latents, ctx.t)  # as the loop's own predict
        n = len(cond)
        parts = ([] if ctx.uncond is None else [ctx.uncond]) + [cond, original]
        off = 0 if ctx.uncond is None else n
        self._lra_rows = (slice(off, off + n), slice(off + n, off + 2 * n))
        try:
            out = adapter.predict_noise(torch.cat([x] * len(parts)), ctx.t, Encoded.cat(parts), None,
                                        ctx.guidance_scale)
        finally:
            self._lra_rows = None
        if ctx.uncond is None:
            return out[:n]
        out_u, out_g = out[:n], out[n:2 * n]
        return out_u + ctx.guidance_scale * (out_g - out_u)

    def module_hooks(self, adapter: Any) -> dict[str, Callable]:
        if not self.cfg.lra:
            return {}
        # family-specific: SD-style UNet2DConditionModel paths ``unet.down_blocks.<j>`` (SD1.x/2.x, SDXL, world)
        hooks = {}
        for j, entries in lra_skip_map(adapter.pipe.unet, self.cfg.lra_s1, self.cfg.lra_s2).items():
            hooks[f"unet.down_blocks.{j}"] = self._skip_hook(entries)
        return hooks

    def _skip_hook(self, entries: dict[int, float]) -> Callable:
        def fn(module: Any, args: Any, output: Any) -> Any:
            if self._lra_rows is None:
                return None
            hidden, skips = output
            skips = list(skips)
            for k, s in entries.items():
                skips[k] = _lra_filter(skips[k], *self._lra_rows, s)
            return hidden, tuple(skips)
        return fn


# ---------------------------------------------------------------------- the method
class SAFREE(Method):
    name = "safree"
    family = "guard"
    edit_kind = "hook"
    description = ("SAFREE: project the prompt's trigger tokens off the concept's subspace for the first steps "
                   "(self-validating filter), a hook edit, training-free")
    Config = SafreeConfig

    def uses_keep_phrases(self) -> bool:
        return False  # its toxic subspace is spanned by the erased phrases (and its keywords) alone

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """On the embedded world: SAFREE_WORLD and the world's erase templates for the concepts' axis."""
        return {**super().world_settings(concepts), **SAFREE_WORLD}

    def keywords(self, concepts: list[ConceptSpec]) -> list[str]:
        words = [p for c in concepts for p in c.erase_phrases] + [" ".join(k.split()) for k in self.config.keywords]
        words = list(dict.fromkeys(w for w in words if w))
        if not words:
            raise InvalidInputError("safree needs at least one toxic keyword; name a concept")
        return words

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:
        t0 = time.perf_counter()
        if adapter.family not in ("sd", "sdxl"):
            raise InvalidInputError(f"safree supports Stable Diffusion 1.x/2.x and SDXL pipelines, not the "
                                    f"{adapter.family!r} family")
        unet = adapter.pipe.unet
        if self.config.lra and not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
            raise InvalidInputError("safree's lra needs a UNet with down_blocks and up_blocks; set lra=false")
        words = self.keywords(concepts)
        with torch.no_grad():
            c = pooled(adapter.encode(words)).detach().to("cpu", torch.float32).contiguous()
        return HookEdit({"concept_embeds": c}, {
            "method": self.name, "config": config_dict(self.config), "concepts": [x.to_dict() for x in concepts],
            "family": adapter.family, "base_fingerprint": adapter.fingerprint(),  # its tensors are this model's
            "hook": {"keywords": words, "negative_prompt": ", ".join(words)}, "erasekit_version": __version__,
            "wall_time_s": round(time.perf_counter() - t0, 4)})

    @classmethod
    def make_hooks(cls, edit: Edit, adapter: Any) -> list[Hook]:
        cfg = config_from_dict(SafreeConfig, dict(edit.manifest["config"]))
        prompt = str(edit.manifest["hook"]["negative_prompt"])
        return [SafreeHook(projector(edit.tensors()["concept_embeds"]), cfg, prompt)]
