"""ESD (Erasing Concepts from Diffusion Models, Gandikota et al. 2023): fine-tune the model so that,
conditioned on the concept, it predicts what the frozen model predicts with negative guidance away
from the concept.

    target = f(x_t, ∅, t) − η [f(x_t, c, t) − f(x_t, ∅, t)]        L = ‖θ(x_t, c, t) − target‖²

where f is the frozen model and x_t is drawn by running DDIM (``ddim_steps``, guidance
``sample_guidance``) from the concept prompt and stopping after a random number of steps. With
``erase_from`` (the diffusers version), x_t is drawn from that prompt, the model is conditioned on it
and the target is ``f(c_f) − η [f(c) − f(∅)]``. The outputs are the model's own prediction type
(ε, v or x0): the target is an affine combination with weights summing to one, which commutes with
the affine maps between prediction types, so it is the same objective on a v-prediction model.

Where the official codes disagree (../shared/METHODS.md §2.1), and what we chose:
- x_t comes from the frozen model (diffusers' ``esd_sd.py``; the default, ``xt_from=frozen``), or from
  the model being trained as the CompVis ``train-esd.py`` does (``xt_from=trained``).
- The trained model is queried at the scheduler's timestep of the step where sampling stopped, the
  latent's noise level (diffusers), not CompVis's DDPM t drawn in a 20-wide bucket.
- ``params=u`` follows CompVis's ``noxattn`` (no cross-attention, no time embedding, no output conv;
  diffusers' ``esd-u`` also trains the last two) but trains linear and convolution layers only, not
  norms; with ``rank > 0`` only its linear layers get adapters.
- Defaults are the paper's / CompVis's (1000 steps, Adam lr 1e-5, η = 1); the diffusers script uses
  200 steps, lr 5e-5, η = 2.
- Without ``erase_from`` the diffusers ``esd_sd.py`` trains towards ``f(c) − η [f(c) − f(∅)]`` (its
  ``erase_from`` prediction defaults to the concept's), which is the target above with η − 1: its
  default η = 2 is the paper's η = 1. ``negative_guidance = η_diffusers − 1`` gives its objective.
  It also runs everything in bf16 (hard-coded); here precision is ``mixed_precision``.

Preservation (ours, off by default as in the paper and both official codes, which have none): with
``preserve_weight = λ > 0`` each example also draws one of the concepts' neighbour/preserve prompts
p (every phrase in every template; the empty prompt when the concepts name none, as UCE preserves "")
and adds ``λ ‖θ(x_t, p, t) − f(x_t, p, t)‖²`` at the same x_t: the erasure's change is pulled back where
it leaks into the kept concepts. It costs one frozen call per example and doubles the trained call's
batch, not another trajectory; its draws come from their own stream, so turning it on changes no
other draw.

Engineering (same draws, less work): ``prefetch`` steps' trajectories are sampled as one batch by
the frozen model (rows leave the batch at their stopping step; every draw depends on the seed and
the step only, so ``prefetch`` changes what is computed together, not what is drawn), and the frozen predictions the loss
needs at x_t are the two halves of the classifier-free-guidance call the trajectory makes there
anyway, so they cost nothing extra. ``prefetch=1`` samples step by step. A batch runs until its
latest stop while its rows leave one by one, so it makes about as many calls as the longest of its
stops; with ``lookahead=L`` the trajectories of L batches are drawn together and regrouped by stopping
step into batches of the same size, whose rows stop close together: the same rows go through the UNet
in fewer, fuller calls (at DDIM 50 and ``prefetch=8``, 5.8 calls per step become 3.5 at L = 8), no call
is larger, and only the chunk's x_t and frozen predictions (latents) wait in memory. ``compile`` puts those
no-gradient calls (most of ESD's arithmetic) behind ``torch.compile`` with a dynamic batch; the trained
pass stays eager. On an H200 a static-shape compile of an SD1.5-sized bf16 channels-last UNet took a
batch-16 call from 56.5 ms (49.1 contiguous) to 33.5 ms (``benchmarks/unet_forward.py``); ESD's own
compiled runs are not yet timed on a GPU. Compiled kernels round differently, so the edit is not
bit-identical to an eager run's, and a run may be resumed with ``compile`` switched either way.

Less sampling (changes what is drawn; off by default): with ``trajectory_reuse=r`` the official codes'
one trajectory per step becomes one per r consecutive steps: the steps of a group share the first
step's prompt and initial noise, and each takes x_t at its own stopping step, so every x_t keeps its
distribution but the group's x_t are correlated. A trajectory then costs its longest stop once
instead of r stops (E[max of r] of the r draws). ``benchmarks/esd_speed.py`` times it and
``benchmarks/world_erasure.py --set esd.trajectory_reuse=R`` measures what it does to the erasure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Encoded
from ..concepts import ConceptSpec
from ..errors import InvalidInputError
from ..training import Trainable, TrainingConfig, step_generator
from .closed_form import pairs, preserve_prompts
from .finetune import FineTuneMethod, repeat_encoded, select_params


@dataclass(frozen=True)
class ESDConfig(TrainingConfig):
    """ESD's settings (paper / CompVis defaults)."""

    steps: int = field(default=1000, metadata={"help": "optimisation steps (CompVis 1000; diffusers 200)", "min": 1})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate (CompVis 1e-5; diffusers 5e-5)",
                                              "above": 0.0})
    params: str = field(default="x", metadata={
        "help": "x: every cross-attention linear layer (ESD-x); u: everything outside cross-attention but the "
                "time embedding and output conv (ESD-u); x-strict: cross-attention K/V only",
        "choices": ("x", "u", "x-strict")})
    negative_guidance: float = field(default=1.0, metadata={
        "help": "η, how far the target is pushed away from the concept (CompVis 1; diffusers 2)", "min": 0.0})
    erase_from: str = field(default="", metadata={
        "help": "diffusers' option: sample and condition on this prompt instead of the concept (\"\" = off)"})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the trajectories x_t is drawn from",
                                                  "min": 1, "max": 1000})
    sample_guidance: float = field(default=3.0, metadata={"help": "guidance scale of those trajectories",
                                                          "min": 0.0})
    xt_from: str = field(default="frozen", metadata={
        "help": "which model samples x_t: frozen (diffusers) or trained (CompVis)", "choices": ("frozen", "trained")})
    prefetch: int = field(default=8, metadata={
        "help": "trajectories sampled together in one batch (frozen sampling only; 1 = step by step)",
        "min": 1, "max": 256})
    lookahead: int = field(default=1, metadata={
        "help": "batches of prefetch trajectories drawn ahead together and regrouped by stopping step, so that the rows "
                "of each batch stop close together and no UNet call grows (frozen sampling only; 1 = off)",
        "min": 1, "max": 64})
    trajectory_reuse: int = field(default=1, metadata={
        "help": "optimisation steps that take their x_t from one trajectory, each at its own stopping step "
                "(frozen sampling only; 1 = a fresh trajectory per step, as the official codes)",
        "min": 1, "max": 64})
    templates: tuple[str, ...] = field(default=("{}",), metadata={
        "help": "prompt templates the concept is put into ({} = phrase); one is drawn per example",
        "min_items": 1, "each_contains": "{}"})
    preserve_weight: float = field(default=0.0, metadata={
        "help": "weight of a preservation term (0 = off, as the paper and both official codes): at each x_t the "
                "trained model, conditioned on one of the concepts' neighbour/preserve prompts (the empty prompt "
                "when there are none), is pulled to the frozen model's prediction", "min": 0.0})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the UNet for the no-gradient calls that draw x_t and the frozen predictions (most of "
                "ESD's arithmetic; the batch size may vary without recompiling); the trained pass stays eager. The "
                "first calls compile (a static SD1.5-sized compile took 47 s on an H200): for long runs on a GPU"})


COMPILE_BACKEND = "inductor"  # tests swap in a recording backend (the same graph capture, run as captured)
#: compiled graphs allowed per UNet code object while ESD draws (torch's default, 8, is shared by every UNet of
#: the class and every setting tried in one process; past it torch runs eagerly without saying so)
RECOMPILE_LIMIT = 64


def draw_keep(seed: int, step: int, batch: int, n_keep: int) -> torch.Tensor:
    """Step ``step``'s preserve prompt indices (their own stream: turning the term on changes no other draw)."""
    return torch.randint(n_keep, (batch,), generator=step_generator(seed, "esd-preserve", step))


def draw_example(seed: int, step: int, batch: int, n_prompts: int, ddim_steps: int,
                 shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s prompt indices, stopping steps and initial noise: they depend on the seed and the
    step alone, so ``prefetch`` (how many steps are sampled together) changes no draw."""
    g = step_generator(seed, "esd", step)
    return (torch.randint(n_prompts, (batch,), generator=g), torch.randint(ddim_steps, (batch,), generator=g),
            torch.randn((batch, *shape), generator=g))


@dataclass
class _Rows:
    """A chunk of examples: x_t, timesteps, prompt indices and the frozen model's predictions at x_t
    unconditioned, on the concept prompt, and on the ``erase_from`` prompt (None without one); with
    ``preserve_weight``, the preserve prompt indices and the frozen predictions on them."""

    x: torch.Tensor
    t: torch.Tensor
    prompt: torch.Tensor
    f_uncond: torch.Tensor
    f_concept: torch.Tensor
    f_source: torch.Tensor | None
    keep: torch.Tensor | None = None
    f_keep: torch.Tensor | None = None


#: ESD-x on the embedded world (chosen on star with training-template prompts, 24 + 24 images: detection
#: 1.00 -> 0.08, other shapes 1.00 -> 1.00): the paper's lr 1e-5 barely moves this small model, and its
#: sampler's 20 steps suffice for x_t. ``erasekit erase`` on the world uses these unless --set overrides.
#: Re-chosen on the shipped broad-grammar model by the rule of ``UCE_WORLD`` (highest mean templated H over
#: star, heart and circle, seeds 100-115; ``world_erasure.py`` on a CPU): lr 1e-3 (the first model's) /
#: lr 5e-4 / 120 steps at 1e-3 gave H 0.945 / 0.957 / 0.850 (paraphrases 0.944 / 0.944 / 0.864), so 5e-4.
#: Then, with the preservation term (ours; the world benchmarks pass the axis's other values as preserve
#: prompts), by the same rule: η 1 / 2 / 3 / 4 / 6 at preserve_weight 1 gave H 0.925 / 0.970 / 0.977 / 0.988 /
#: 0.984, preserve_weight 0.5 / 3 (η 4 / 3) 0.984 / 0.962, 120 steps (η 1) 0.954, lr 1e-3 (η 1) 0.900; without
#: the term η 1 / 2 gave 0.957 / 0.964 and lost 6 / 10 points of the other shapes. So η 4, preserve_weight 1.
ESD_WORLD: dict[str, object] = {"steps": 60, "lr": 5e-4, "ddim_steps": 20, "negative_guidance": 4.0,
                                "preserve_weight": 1.0}


class ESD(FineTuneMethod):
    name = "esd"
    description = "ESD: fine-tune towards the frozen model's negative guidance away from the concept"
    Config = ESDConfig

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        return {**ESD_WORLD, **super().world_settings(concepts)}

    def check(self, concepts: list[ConceptSpec]) -> None:
        cfg: ESDConfig = self.config
        if cfg.trajectory_reuse > 1 and cfg.xt_from == "trained":
            raise InvalidInputError("trajectory_reuse needs xt_from=frozen (the trained model's trajectories change "
                                    "every step); set trajectory_reuse=1 or xt_from=frozen")
        for c in concepts:
            if c.anchor:
                raise InvalidInputError(f"ESD erases towards negative guidance, not an anchor (concept {c.target!r} "
                                        f"has anchor {c.anchor!r}); drop --anchor or use erase_from")
            if cfg.erase_from and cfg.erase_from.strip().lower() in {p.lower() for p in c.erase_phrases}:
                raise InvalidInputError(f"erase_from {cfg.erase_from!r} is the concept itself; choose another "
                                        "prompt or leave erase_from empty")

    def uses_keep_phrases(self) -> bool:
        return self.config.preserve_weight > 0  # the preservation term is where they are read

    def trained_params(self, adapter: Any) -> list[str]:
        return select_params(adapter, self.config.params)

    def prepare(self, adapter: Any, concepts: list[ConceptSpec], trainable: Trainable) -> dict[str, Any]:
        from diffusers import DDIMScheduler

        cfg: ESDConfig = self.config
        prompts, _ = pairs(concepts, cfg.templates)
        if cfg.erase_from:
            sources = [" ".join(t.replace("{}", cfg.erase_from).split()) for c in concepts for _ in c.erase_phrases
                       for t in cfg.templates]
        else:
            sources = prompts
        keep: list[str] = []
        if cfg.preserve_weight > 0:  # every neighbour/preserve phrase in every template; "" without any
            keep = preserve_prompts(concepts, cfg.templates) or [""]  # refuses what another concept erases
        adapter.check_length(prompts + sources + keep)
        with torch.no_grad():
            enc = adapter.encode(prompts, unique=False)
            enc_src = adapter.encode(sources, unique=False) if cfg.erase_from else enc
            enc_keep = adapter.encode(keep, unique=False) if keep else None
            uncond = adapter.uncond(1)
        sched = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
        sched.set_timesteps(cfg.ddim_steps, device=adapter.device)
        unet = adapter.pipe.unet
        size = adapter.image_size
        shape = (unet.config.in_channels, size[0] // adapter.pipe.vae_scale_factor,
                 size[1] // adapter.pipe.vae_scale_factor)
        compiled = None
        if cfg.compile:
            if not hasattr(adapter, "unet_calls"):
                raise InvalidInputError(f"compile=true needs an adapter that can route its UNet calls; "
                                        f"{type(adapter).__name__} cannot: set compile=false")
            compiled = torch.compile(unet, dynamic=True, backend=COMPILE_BACKEND)
        return {"prompts": prompts, "enc": enc, "enc_src": enc_src, "uncond": uncond, "sched": sched,
                "shape": shape, "chunk": None, "rows": None, "keep": keep, "enc_keep": enc_keep,
                "compiled": compiled}

    # ------------------------------------------------------------------ data
    def _chunk_size(self) -> int:
        cfg: ESDConfig = self.config
        return 1 if cfg.xt_from == "trained" else cfg.prefetch * cfg.trajectory_reuse * cfg.lookahead

    def _draw(self, adapter: Any, state: dict[str, Any], trainable: Trainable, chunk: int) -> _Rows:
        """Sample the x_t of every example of ``chunk`` (seeded by the seed and the chunk alone)."""
        compiled = state.get("compiled")
        if compiled is None:
            return self._draw_rows(adapter, state, trainable, chunk)
        import torch._dynamo

        cfg = torch._dynamo.config  # the limit's name before torch 2.6 was cache_size_limit
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        with adapter.unet_calls(compiled), cfg.patch(**{name: max(RECOMPILE_LIMIT, getattr(cfg, name, 8))}):
            return self._draw_rows(adapter, state, trainable, chunk)  # every call here is without gradients

    def _draw_rows(self, adapter: Any, state: dict[str, Any], trainable: Trainable, chunk: int) -> _Rows:
        rows = self._draw_xt(adapter, state, trainable, chunk)
        cfg: ESDConfig = self.config
        if state["enc_keep"] is None:
            return rows
        size, b = self._chunk_size(), cfg.batch_size
        first, end = chunk * size, min((chunk + 1) * size, cfg.steps)
        rows.keep = torch.cat([draw_keep(cfg.seed, step, b, len(state["keep"])) for step in range(first, end)])
        at = max(cfg.prefetch, 1) * b  # frozen calls no larger than the trajectories' batches
        with trainable.frozen():
            rows.f_keep = torch.cat([adapter.predict_noise(rows.x[i:i + at], rows.t[i:i + at],
                                                           state["enc_keep"].index(rows.keep[i:i + at].tolist()))
                                     for i in range(0, len(rows.x), at)]).to(rows.x.dtype)
        return rows

    def _draw_xt(self, adapter: Any, state: dict[str, Any], trainable: Trainable, chunk: int) -> _Rows:
        cfg: ESDConfig = self.config
        size, b = self._chunk_size(), cfg.batch_size
        reuse = cfg.trajectory_reuse if cfg.xt_from == "frozen" else 1
        first, end = chunk * size, min((chunk + 1) * size, cfg.steps)  # the last chunk stops at the last step
        n = (end - first) * b
        prompt, stop, noise = [], [], []
        for step in range(first, end):  # each step's draws depend on the seed and step only
            p, s_, z = draw_example(cfg.seed, step, b, len(state["prompts"]), cfg.ddim_steps, state["shape"])
            if step % reuse:  # a later step of a group: the group's first step's prompt and noise, its own stop
                p, z = prompt[-1], noise[-1]
            prompt.append(p)
            stop.append(s_)
            noise.append(z)
        lead = torch.arange(0, end - first, reuse)  # the steps whose trajectories are sampled
        # row i of the chunk (step i // b, example i % b) reads trajectory row (i // b // reuse) * b + i % b
        traj = (torch.arange(n) // b // reuse) * b + torch.arange(n) % b
        prompt, stop = torch.cat(prompt), torch.cat(stop)
        t_prompt = torch.cat([prompt[int(s) * b:(int(s) + 1) * b] for s in lead])
        # each trajectory runs to its group's last stop (a chunk's last group may be short)
        last = torch.zeros(len(t_prompt), dtype=stop.dtype).scatter_reduce(0, traj, stop, "amax")
        x = torch.cat([noise[int(s)] for s in lead]).to(adapter.device, adapter.pipe.unet.dtype)
        sched = state["sched"]
        x = x * sched.init_noise_sigma
        src: Encoded = state["enc_src"]
        out_x = x.new_empty((n, *x.shape[1:]))
        out_u, out_c = torch.empty_like(out_x), torch.empty_like(out_x)
        frozen_sampler = cfg.xt_from == "frozen"
        cap = cfg.prefetch * b  # trajectory rows per UNet call, whatever lookahead is
        # with lookahead > 1 the chunk holds several batches' trajectories: sorted by their last stop, each batch's
        # rows stop close together, so the batches need fewer (and fuller) calls for the same rows and draws
        order = torch.sort(last, stable=True).indices if len(x) > cap else torch.arange(len(x))
        group = torch.empty(len(x), dtype=torch.long)
        group[order] = torch.arange(len(x)) // cap
        with torch.no_grad():
            for g in range(0, len(x), cap):
                active = order[g:g + cap]  # trajectory rows of this batch still running
                mine = group[traj] == g // cap  # the examples this batch's trajectories serve
                for k in range(int(last[active].max()) + 1):
                    t = sched.timesteps[k]
                    xa = sched.scale_model_input(x[active], t)
                    cond = src.index(t_prompt[active].tolist())
                    unc = repeat_encoded(state["uncond"], len(active))
                    ctx = trainable.frozen() if frozen_sampler else torch.no_grad()
                    with ctx:
                        both = adapter.predict_noise(torch.cat([xa, xa]), t, Encoded.cat([unc, cond]))
                    u, c = both.to(x.dtype).chunk(2)  # under bf16/fp16 autocast the UNet answers in that dtype
                    pos = torch.full((len(x),), -1, dtype=torch.long)
                    pos[active] = torch.arange(len(active))
                    rows = ((stop == k) & mine).nonzero().flatten()  # examples whose x_t is this step's latent
                    if len(rows):
                        at = pos[traj[rows]]
                        out_x[rows], out_u[rows], out_c[rows] = x[traj[rows]], u[at], c[at]
                    keep = last[active] > k
                    if not keep.any():
                        break
                    guided = u[keep] + cfg.sample_guidance * (c[keep] - u[keep])
                    idx = active[keep]
                    x[idx] = sched.step(guided, t, x[idx]).prev_sample
                    active = idx
        t_rows = sched.timesteps[stop.to(sched.timesteps.device)]
        idx = prompt.tolist()
        if frozen_sampler:  # the trajectory's last call was the frozen model at x_t: reuse its halves
            f_source = out_c if cfg.erase_from else None
            if cfg.erase_from:  # in batches no larger than the trajectories' (n grows with trajectory_reuse)
                step_rows = max(min(len(t_prompt), cap), 1)
                with trainable.frozen():
                    out_c = torch.cat([adapter.predict_noise(out_x[i:i + step_rows], t_rows[i:i + step_rows],
                                                             state["enc"].index(idx[i:i + step_rows]))
                                       for i in range(0, n, step_rows)]).to(out_x.dtype)
            return _Rows(out_x, t_rows, prompt, out_u, out_c, f_source)
        with trainable.frozen():
            conds = [repeat_encoded(state["uncond"], n), state["enc"].index(idx)]
            if cfg.erase_from:
                conds.append(src.index(idx))
            f = adapter.predict_noise(torch.cat([out_x] * len(conds)), torch.cat([t_rows] * len(conds)),
                                      Encoded.cat(conds)).to(out_x.dtype).chunk(len(conds))
        return _Rows(out_x, t_rows, prompt, f[0], f[1], f[2] if cfg.erase_from else None)

    def loss(self, adapter: Any, state: dict[str, Any], trainable: Trainable, step: int) -> torch.Tensor:
        cfg: ESDConfig = self.config
        size = self._chunk_size()
        chunk, pos = divmod(step, size)
        if state["chunk"] != chunk:
            state["rows"], state["chunk"] = self._draw(adapter, state, trainable, chunk), chunk
        rows: _Rows = state["rows"]
        sl = slice(pos * cfg.batch_size, (pos + 1) * cfg.batch_size)
        eta = cfg.negative_guidance
        idx = rows.prompt[sl].tolist()
        base = rows.f_source[sl] if rows.f_source is not None else rows.f_uncond[sl]
        target = base - eta * (rows.f_concept[sl] - rows.f_uncond[sl])
        cond = (state["enc_src"] if cfg.erase_from else state["enc"]).index(idx)
        x, t = rows.x[sl], rows.t[sl]  # DDIM's model input is x_t itself
        if rows.f_keep is None:
            pred = adapter.predict_noise(x, t, cond)
            return torch.nn.functional.mse_loss(pred.float(), target.float())
        keep = state["enc_keep"].index(rows.keep[sl].tolist())  # one call for both terms
        pred, pred_keep = adapter.predict_noise(torch.cat([x, x]), torch.cat([t, t]), Encoded.cat([cond, keep])).chunk(2)
        return (torch.nn.functional.mse_loss(pred.float(), target.float())
                + cfg.preserve_weight * torch.nn.functional.mse_loss(pred_keep.float(), rows.f_keep[sl].float()))

    def extra_manifest(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"esd_prompts": len(state["prompts"]), **({"esd_preserve_prompts": len(state["keep"])}
                                                         if state["keep"] else {})}

