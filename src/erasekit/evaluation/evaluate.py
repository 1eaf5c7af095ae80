"""``erasekit.evaluate``: generate with and without a patch on the same seeds, and measure."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..adapters import Encoded, get_adapter
from ..concepts import ConceptSpec, check_text, make_concepts
from ..edits import Edit, load_edit
from ..errors import InvalidInputError
from .cache import ImageCache, edits_key, state_key
from .judges import Judge, WorldJudge, get_judge
from .metrics import (
    efficacy,
    eval_cost,
    fidelity,
    generality,
    harmonic_interval,
    harmonic_scores,
    specificity,
)
from .metrics.clip_score import clip_scores
from .metrics.fidelity import check_features, reference_distances, reference_features, reference_files
from ..world.vocab import find_axis
from .prompts import PromptSet, load_unrelated, read_prompt_lines, world_exclusions
from .stats import METHOD

#: prefix of the paraphrase family's prompt-set names in ``images`` and ``prompts``
PARAPHRASE = "paraphrase/"


@dataclass
class ConceptResult:
    """One concept's measurements. ``metrics`` are on the templated prompt sets, ``paraphrase`` the
    same metrics on the paraphrase family (None where the judge has none); ``images`` and
    ``prompts`` are keyed by set name, the paraphrase sets as ``"paraphrase/target"`` etc."""

    concept: str
    axis: str
    label: str
    metrics: dict[str, Any]
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    prompts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    paraphrase: dict[str, Any] | None = None
    robustness: dict[str, Any] = field(default_factory=dict)
    #: per prompt family, each headline's per-image outcomes (original and patched, one per prompt and
    #: seed) and each image's prompt: what paired comparisons between edits are computed from (not saved)
    outcomes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict, repr=False)

    def families(self) -> dict[str, dict[str, Any]]:
        """The headline figures of each prompt family, side by side (see :func:`family_summary`)."""
        out = {"templated": family_summary(self.metrics)}
        if self.paraphrase is not None:
            out["paraphrase"] = family_summary(self.paraphrase)
        return out


#: (summary name, metric key): the patched model's figures a family is read by
SUMMARY_KEYS = (("detected_before", "efficacy_original"), ("detected_after", "efficacy_patched"),
                ("synonyms_after", "generality_patched"), ("neighbours_kept", "specificity_neighbours_patched"),
                ("unrelated_kept", "specificity_unrelated_patched"), ("collateral_kept", "specificity_collateral_patched"))


def family_summary(m: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of one prompt family: rates with their intervals, and H with its interval."""
    out: dict[str, Any] = {name: {"value": m[k]["value"], "ci95": m[k]["ci95"]} for name, k in SUMMARY_KEYS if k in m}
    out["H"] = {"value": m["harmonic"], "ci95": m.get("harmonic_ci95")}
    out["H_before"] = {"value": m["harmonic_original"], "ci95": m.get("harmonic_original_ci95")}
    return out


@dataclass
class EvalResult:
    """Everything ``erasekit eval`` measured, plus what is needed to reproduce it."""

    concepts: list[ConceptResult]
    settings: dict[str, Any]
    cost: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        def concept(c: ConceptResult) -> dict[str, Any]:
            d = {"concept": c.concept, "axis": c.axis, "label": c.label, "families": c.families(),
                 "metrics": c.metrics}
            if c.paraphrase is not None:
                d["paraphrase_metrics"] = c.paraphrase
            if c.robustness:
                d["robustness"] = c.robustness
            d["prompts"] = c.prompts
            return d

        return {"erasekit_version": __version__, "settings": self.settings, "cost": self.cost,
                "concepts": [concept(c) for c in self.concepts]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"


#: seeds are torch generator seeds: 0 <= seed < 2**63; an evaluation takes at most this many
MAX_SEED, MAX_SEEDS = 2**63 - 1, 100_000


def parse_seeds(text: str) -> list[int]:
    """'0-63', '0,5,9' or '3' -> list of seeds."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            a, _, b = part.partition("-") if not part.startswith("-") else (part, "", "")
            lo, hi = int(a), int(b) if b else int(a)
            if not 0 <= lo <= MAX_SEED or not 0 <= hi <= MAX_SEED or hi - lo + len(out) >= MAX_SEEDS:
                raise InvalidInputError(f"seeds {text!r}: each seed is 0..2**63-1 and a run takes at most "
                                        f"{MAX_SEEDS} of them; write e.g. 0-63")
            out.extend(range(lo, hi + 1))
    except ValueError:
        raise InvalidInputError(f"cannot read seeds {text!r}; write e.g. 0-63 or 0,1,2") from None
    if not out:
        raise InvalidInputError(f"the seed range {text!r} is empty; write e.g. 0-63")
    return out


def _sampling(pipe: Any, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from ..models import sampling_defaults

    s = dict(sampling_defaults(getattr(pipe, "erasekit_source", "") or ""))
    s.update(overrides or {})
    s["scheduler"] = type(pipe.scheduler).__name__
    config = getattr(pipe.scheduler, "config", None)
    if config is not None:
        s["scheduler_config"] = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        s["height"] = s.get("height") or unet.config.sample_size * pipe.vae_scale_factor
    return s


def _sampler(pipe: Any) -> Callable[[list[str] | Encoded, list[torch.Generator], dict[str, Any]], np.ndarray]:
    """A function (prompts or their encodings, generators, sampling) -> float images (N, H, W, 3).

    Supported pipelines sample through the adapter's loop (so hook edits act); a stand-in that
    states ``erasekit_fingerprint`` is called like a diffusers pipeline (text prompts only)."""
    if getattr(pipe, "erasekit_fingerprint", None):
        def call(prompts: list[str] | Encoded, gens: list[torch.Generator], s: dict[str, Any]) -> np.ndarray:
            if isinstance(prompts, Encoded):
                raise InvalidInputError("this generator takes text prompts only; pass prompt sets without embeddings")
            return pipe(prompts, generator=gens, num_inference_steps=s["num_inference_steps"],
                        guidance_scale=s["guidance_scale"], output_type="np").images
        return call
    adapter = get_adapter(pipe)
    return lambda prompts, gens, s: adapter.sample(prompts, gens, s["num_inference_steps"], s["guidance_scale"])


def generate_cached(pipe: Any, ps: PromptSet, seeds: list[int], sampling: dict[str, Any], cache: ImageCache,
                    state: str, batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 3), one per (prompt, seed), from the pipeline as it is now (``state`` is its
    :func:`~erasekit.evaluation.cache.state_key`); cached ones are not regenerated."""
    keys = [cache.key(state, ps.key(i), s, sampling) for i, s in enumerate(seeds)]
    out: list[np.ndarray | None] = [cache.get(k) for k in keys]
    todo = [i for i, im in enumerate(out) if im is None]
    run = _sampler(pipe)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in idx]
        cond = ps.embeddings.index(idx) if ps.embeddings is not None else [ps.prompts[i] for i in idx]
        res = run(cond, gens, sampling)
        for j, i in enumerate(idx):
            img = np.round(np.clip(res[j], 0, 1) * 255).astype(np.uint8)
            cache.put(keys[i], img)  # written as soon as made: an interrupted run keeps them
            out[i] = img
    return np.stack(out)  # type: ignore[arg-type]


def _generate_sets(pipe: Any, sets: Mapping[str, PromptSet], seeds: list[int], sampling: dict[str, Any],
                   cache: ImageCache, state: str) -> dict[str, np.ndarray]:
    """:func:`generate_cached` for every set, the text sets in shared batches: a small evaluation
    otherwise runs one short batch per set, and the UNet's per-call cost dominates."""
    out: dict[str, np.ndarray] = {}
    text = [name for name, ps in sets.items() if ps.embeddings is None]
    if text:
        merged = PromptSet("merged", tuple(p for n in text for p in sets[n].prompts),
                           tuple(lab for n in text for lab in sets[n].labels))
        images = generate_cached(pipe, merged, seeds * len(text), sampling, cache, state)
        for i, name in enumerate(text):
            out[name] = images[i * len(seeds):(i + 1) * len(seeds)]
    for name, ps in sets.items():
        if ps.embeddings is not None:
            out[name] = generate_cached(pipe, ps, seeds, sampling, cache, state)
    return {name: out[name] for name in sets}


def _edits(patch: Any) -> list[Edit]:
    """An edit, an edit folder, or a list of either, as a list of edits."""
    single = patch is None or isinstance(patch, (Edit, str, Path)) or not isinstance(patch, (list, tuple))
    items = ([] if patch is None else [patch]) if single else list(patch)
    out = [load_edit(p) if isinstance(p, (str, Path)) else p for p in items]
    bad = [type(p).__name__ for p in out if not isinstance(p, Edit)]
    if bad:
        raise InvalidInputError(f"patch must be an edit, an edit folder or a list of them, not {bad[0]}")
    return out


def _check_labels(ps: PromptSet, judge: Judge, axis: str) -> None:
    """Every label of a prompt set from outside names the concept's axis, with values the judge knows."""
    names = judge.axes()
    for lab in ps.labels:
        if not isinstance(lab, dict) or axis not in lab:
            raise InvalidInputError(f"prompt set {ps.name!r}: each label must name the concept's axis {axis!r}, "
                                    f"e.g. {{{axis!r}: {names[axis][0]!r}}}")
        unknown = [f"{a}={v!r}" for a, v in lab.items() if a in names and v not in names[a]]
        if unknown or any(a not in names for a in lab):
            bad = unknown[0] if unknown else next(a for a in lab if a not in names)
            raise InvalidInputError(f"prompt set {ps.name!r}: label {bad} is not one the judge reads; "
                                    f"known axes: {', '.join(names)}")


def _check_prompt_sets(sets: Mapping[str, Mapping[str, PromptSet]] | None, specs: list[ConceptSpec],
                       n: int) -> dict[str, Mapping[str, PromptSet]]:
    """Prompt sets from outside, checked: known concepts, a target set, one prompt per seed."""
    if not sets:
        return {}
    targets = {s.target for s in specs}
    for concept, by_name in sets.items():
        if concept not in targets:
            raise InvalidInputError(f"prompt sets are given for {concept!r}, which is not among the concepts "
                                    f"evaluated ({', '.join(sorted(targets))})")
        if "target" not in by_name:
            raise InvalidInputError(f"the prompt sets for {concept!r} have no 'target' set; efficacy needs one")
        for name, ps in by_name.items():
            if len(ps) != n:
                raise InvalidInputError(f"prompt set {name!r} of {concept!r} has {len(ps)} prompts for {n} seeds; "
                                        "give one prompt per seed")
    return dict(sets)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _score(judge: Judge, images: np.ndarray, ps: PromptSet, axis: str, label: str) -> dict[str, np.ndarray]:
    probs = judge.probs(_to_tensor(images))
    names = judge.axes()
    pred = {a: probs[a].argmax(-1).numpy() for a in probs}
    k = names[axis].index(label)
    out = {"detected": (pred[axis] == k).astype(float), "p_target": probs[axis][:, k].numpy().astype(float)}
    want = np.array([names[axis].index(lab[axis]) for lab in ps.labels])
    out["axis_correct"] = (pred[axis] == want).astype(float)
    # other axes the prompts name (world: colour, texture...); a one-axis judge has none
    other = [a for a in names if a != axis and a in pred and all(a in lab for lab in ps.labels)]
    if other:
        out["other_axes_correct"] = np.mean([[pred[a][i] == names[a].index(ps.labels[i][a]) for a in other]
                                             for i in range(len(ps.labels))], axis=1).astype(float)
    return out


def _unrelated(unrelated: Sequence[str] | str | Path | None, judge: Judge) -> tuple[str, ...] | None:
    """Unrelated prompts from outside (a list, or a text file's path), checked against the judge."""
    if unrelated is None:
        return None
    if not getattr(judge, "reads_unrelated_prompts", True):
        raise InvalidInputError(f"the {judge.name} judge scores the world's own unrelated prompts (the other axes "
                                "of world captions); drop the unrelated prompts, or use an open-vocabulary judge")
    if isinstance(unrelated, (str, Path)):
        return load_unrelated(unrelated)
    if not isinstance(unrelated, (list, tuple)):
        raise InvalidInputError(f"unrelated prompts must be a list of prompts or a file path, not "
                                f"{type(unrelated).__name__}")
    return read_prompt_lines("\n".join(check_text(p, "an unrelated prompt").replace("\n", " ") for p in unrelated),
                             "the unrelated prompt list")


def _family_metrics(judge: Judge, sets: Mapping[str, PromptSet], sc: dict[str, dict[str, dict[str, np.ndarray]]],
                    imgs: dict[str, dict[str, np.ndarray]], fid_features: str,
                    outcomes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every metric of one prompt family (sets keyed target/generality/neighbours/unrelated); the
    headlines' per-image outcomes go into ``outcomes`` where given."""
    both = ("original", "patched")
    cl = {name: [ps.key(i) for i in range(len(ps))] for name, ps in sets.items()}  # each image's prompt
    m: dict[str, Any] = efficacy({v: sc["target"][v]["detected"] for v in both},
                                 {v: sc["target"][v]["p_target"] for v in both}, clusters=cl["target"])
    if "generality" in sc:
        m.update(generality({v: sc["generality"][v]["detected"] for v in both}, clusters=cl["generality"]))
    # neighbours: other values of the target's axis, read on that axis; unrelated: the other axes,
    # or, for a one-axis judge, whether the image still reads as what its prompt asked for
    parts = {"neighbours": "axis_correct", "unrelated": "other_axes_correct"}
    parts = {p: k for p, k in parts.items() if p in sc}
    kept_outcomes = {p: {v: sc[p][v].get(k, sc[p][v]["axis_correct"]) for v in both} for p, k in parts.items()}
    m.update(specificity(kept_outcomes, clusters={p: cl[p] for p in parts}))
    # collateral: on the prompts that name the erased concept, do the other axes they ask for
    # (colour, texture, background) survive? Only for judges that read those axes.
    erased = [p for p in ("target", "generality") if p in sc and "other_axes_correct" in sc[p]["original"]]
    collateral = None
    if erased:
        collateral = {v: np.concatenate([sc[p][v]["other_axes_correct"] for p in erased]) for v in both}
        m.update(specificity({"collateral": collateral}, clusters={"collateral": [k for p in erased for k in cl[p]]}))
    if outcomes is not None:
        named = {"detected": ("target", {v: sc["target"][v]["detected"] for v in both})}
        if "generality" in sc:
            named["synonyms"] = ("generality", {v: sc["generality"][v]["detected"] for v in both})
        named.update({f"{p}_kept": (p, kept_outcomes[p]) for p in kept_outcomes})
        for key, (set_name, o) in named.items():
            outcomes[key] = {**o, "clusters": cl[set_name], "prompts": list(sets[set_name].prompts)}
        if collateral is not None:
            outcomes["collateral_kept"] = {**collateral, "clusters": [k for p in erased for k in cl[p]],
                                           "prompts": [t for p in erased for t in sets[p].prompts]}
    m.update(harmonic_scores(m))
    for v, key in (("patched", "harmonic_ci95"), ("original", "harmonic_original_ci95")):
        m[key] = harmonic_interval(
            (sc["target"][v]["detected"], cl["target"]),
            [(kept_outcomes[p][v], cl[p]) for p in ("neighbours", "unrelated") if p in kept_outcomes],
            (sc["generality"][v]["detected"], cl["generality"]) if "generality" in sc else None)
    # CLIPScore against each image's own prompt (not for sets generated from embeddings: their text only
    # describes them)
    clip = clip_scores(judge, {n: list(ps.prompts) for n, ps in sets.items() if ps.embeddings is None}, imgs, cl)
    if clip is not None:
        m["clip_score"] = clip
    kept = list(parts) or ["target"]  # fidelity on the prompts that should not change, where there are any
    m.update(fidelity(judge, np.concatenate([imgs[p]["original"] for p in kept]),
                      np.concatenate([imgs[p]["patched"] for p in kept]), fid_features,
                      clusters=[k for p in kept for k in cl[p]]))
    return m


def evaluate(pipe: Any, concepts: str | ConceptSpec | Iterable[str | ConceptSpec],
             patch: Edit | Sequence[Edit] | None = None, seeds: Iterable[int] = range(64),
             judge: Judge | str | None = None, cache: ImageCache | str | Path | None = None,
             sampling: dict[str, Any] | None = None, force: bool = False, keep_images: bool = True,
             fid_features: str = "judge",
             prompt_sets: Mapping[str, Mapping[str, PromptSet]] | None = None, paraphrase: bool = True,
             unrelated: Sequence[str] | str | Path | None = None, prompt_seed: int = 0,
             attacks: Sequence[Any] = (), attack_seeds: Iterable[int] | None = None,
             reference_images: str | Path | None = None,
             exclude: Sequence[str | Sequence[str]] = ()) -> EvalResult:
    """Measure what ``patch`` (an edit of any kind, or a stack of them applied in order) does to
    ``concepts`` on ``pipe``: images without and with it on the same seeds, then metrics.

    Metrics per concept, each with a 95% interval that resamples prompts with all their seeds
    (:mod:`erasekit.evaluation.stats`): efficacy (detection of the target on prompts asking for
    it), generality (on unseen synonyms), specificity on neighbours and on unrelated axes (and
    their drop against the unpatched model), MACE's harmonic score (interval by resampling each
    set's prompts), fidelity to the original (judge-feature distance per seed; FID/KID, point
    estimates, in the judge's features or, with ``fid_features="inception"``, torchmetrics'
    Inception features), and cost. ``reference_images`` (a folder of real images, e.g. the
    photographs of the ``unrelated`` captions) adds FID/KID of the original's and the patched
    model's images on the unrelated prompts against them (``ConceptResult.metrics["reference_fid"]``,
    templated family; :func:`~erasekit.evaluation.metrics.reference_distances`): the utility figure
    the papers publish as COCO FID, here with as many generated images as seeds.

    Two prompt families: the judge's templated sets (on the world model, its training caption
    templates; on a real checkpoint "{}", "a photo of {}"..., what most methods fit on) and, with
    ``paraphrase=True`` where the judge has one, the same sets in a grammar disjoint from the erase
    templates, on the same seeds: ``ConceptResult.paraphrase``. The world judge's is
    :mod:`erasekit.evaluation.paraphrase` (also disjoint from the training captions); the CLIP and NudeNet
    judges' is :data:`~erasekit.evaluation.prompts.OPEN_FRAMES`. It doubles the images generated.

    ``prompt_sets`` replaces the judge's prompt sets (and its paraphrase family) for the concepts
    it names (by target): ``{"star": {"target": PromptSet(...), ...}}``, one prompt per seed; a set
    may carry prompt embeddings (an attack's output) that are generated from instead of its text.
    A "target" set is required; the other sets are scored where given.

    ``unrelated`` (a list of prompts or a text file, one a line) replaces the shipped unrelated
    prompts of open-vocabulary judges (CLIP, NudeNet) and the concepts' preserve prompts; the
    prompts are sampled by ``prompt_seed``, which also draws the world's captions.

    A concept the edits also erase (each manifest concept with its synonyms), or that ``exclude``
    names (a phrase, or a list of a phrase and its synonyms), is no neighbour of the one measured: it
    leaves its neighbour prompts (whole words) and, on the world, its unrelated prompts and the
    other axes' draws (``settings["not_neighbours"]`` records what was left out); a concept that names
    the measured one is its own. :func:`erasekit.compare` passes every compared edit's concepts, so
    all of them are measured on the same prompts.

    ``attacks`` (registered names, with their world settings when the judge is the world's, or
    configured :class:`~erasekit.attacks.Attack` objects) adds robustness: each attack runs against
    the patch on the concept's target and synonym prompts (and their paraphrases) for
    ``attack_seeds`` (default: the first 8 seeds), and ``ConceptResult.robustness[name]`` holds its
    pre- and post-attack success with intervals and its cost (:func:`erasekit.attacks.attack`).
    """
    t0 = time.perf_counter()
    check_features(fid_features)
    specs = make_concepts(concepts)
    seeds = list(seeds)
    if not seeds:
        raise InvalidInputError("the seed range is empty; pass e.g. --seeds 0-63")
    if isinstance(prompt_seed, bool) or not isinstance(prompt_seed, int):
        raise InvalidInputError(f"prompt_seed must be an integer, not {type(prompt_seed).__name__}")
    patches = _edits(patch)
    judge = get_judge(judge or "world-classifier") if isinstance(judge, str) or judge is None else judge
    extra = _unrelated(unrelated, judge)
    ref_files = None
    if reference_images is not None:
        if fid_features == "judge" and not getattr(judge, "image_features", True):
            raise InvalidInputError(f"the {judge.name} judge has no image features to compare reference images in; "
                                    "use --fid-features inception, or another judge")
        if len(seeds) < 2:
            raise InvalidInputError("reference FID needs at least 2 seeds (one unrelated image each); pass e.g. "
                                    "--seeds 0-63")
        ref_files = reference_files(reference_images)
    cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
    resolved = [(s, *judge.prepare(s)) for s in specs]  # fail early on unknown concepts
    given = _check_prompt_sets(prompt_sets, specs, len(seeds))
    for spec, axis, _ in resolved:
        for ps in (given.get(spec.target) or {}).values():
            _check_labels(ps, judge, axis)
    # a custom generator that is not a supported pipeline may state its own fingerprint
    custom = getattr(pipe, "erasekit_fingerprint", None)
    if custom and any(e.kind == "hook" for e in patches):
        raise InvalidInputError("this generator is not a supported pipeline, so it cannot run hook edits; "
                                "evaluate hook edits on a diffusers pipeline")
    for p in patches:  # refuse an edit for another model before generating anything
        p.check(pipe, force)
    attack_objs = _attacks(attacks, judge)
    a_seeds = seeds[:8] if attack_seeds is None else list(attack_seeds)
    if attack_objs and (custom or not a_seeds):
        raise InvalidInputError("attacks need a diffusers pipeline and at least one attack seed" if not custom else
                                "this generator is not a supported pipeline, so it cannot be attacked")
    state = custom or state_key(pipe)
    patched_state = edits_key(state, patches)
    patch_key = "+".join(p.digest for p in patches) or "none"
    samp = _sampling(pipe, sampling)
    ref_feats: dict[tuple[int, int], dict[str, Any]] = {}  # by image size: each reference image is embedded once

    def ref_at(h: int, w: int) -> dict[str, Any]:
        if (h, w) not in ref_feats:
            ref_feats[h, w] = reference_features(judge, ref_files, h, w, fid_features)
        return ref_feats[h, w]

    if ref_files is not None and samp.get("height"):  # a diffusers pipeline: read the folder before generating
        ref_at(int(samp["height"]), int(samp.get("width") or samp["height"]))
    hits0, miss0 = cache.hits, cache.misses
    results = []
    t_gen = 0.0
    any_paraphrase = False
    # what the measured edits erase, one entry per concept (its target and synonyms), and what the caller
    # says is erased besides (a phrase, or a phrase with its synonyms)
    entries = [[w.strip() for w in (c.get("target"), *(c.get("synonyms") or ())) if isinstance(w, str) and w.strip()]
               for p in patches for c in p.manifest.get("concepts", [])]
    for item in [exclude] if isinstance(exclude, str) else exclude:
        words = [item] if isinstance(item, str) else list(item)
        entries.append([check_text(w, "an excluded concept").strip() for w in words if w.strip()])
    entries = [e for e in entries if e]
    left_out: dict[str, Any] = {}
    for spec, axis, label in resolved:
        n = len(seeds)
        # another concept the edits erase is no neighbour: it leaves the neighbour (and world unrelated) prompts.
        # An entry that names the measured concept (any of its phrases, or on the world its value) is its own.
        mine = {w.strip().lower() for w in spec.erase_phrases}

        def own(entry: list[str]) -> bool:
            return any(w.lower() in mine or (isinstance(judge, WorldJudge) and find_axis(w.lower()) == (axis, label))
                       for w in entry)

        co_erased = tuple(dict.fromkeys(w for e in entries if not own(e) for w in e))
        removed: dict[str, Any] = {}
        if co_erased and spec.neighbours and spec.target not in given and not isinstance(judge, WorldJudge):
            named = re.compile(r"(?<!\w)(" + "|".join(re.escape(t.lower()) for t in co_erased) + r")(?!\w)")
            dropped = [nb for nb in spec.neighbours if named.search(nb.lower())]
            if dropped:
                spec = dataclasses.replace(spec, neighbours=tuple(nb for nb in spec.neighbours if nb not in dropped))
                removed["neighbours"] = dropped
        params = inspect.signature(judge.prompt_sets).parameters
        # a judge written before prompt seeds and unrelated lists existed is still called as it was
        opts: dict[str, Any] = {"seed": prompt_seed, "unrelated": extra} if (prompt_seed or extra is not None) else {}
        if co_erased and "exclude" in params and spec.target not in given:
            opts["exclude"] = co_erased
            if isinstance(judge, WorldJudge):
                removed.update({a: sorted(v) for a, v in world_exclusions(axis, label, co_erased).items()})
        if removed:
            left_out[spec.target] = removed
        sets = dict(given.get(spec.target) or judge.prompt_sets(spec, axis, label, n, **opts))
        para_fn = getattr(judge, "paraphrase_sets", None)
        # a judge written before paraphrase sets took an unrelated list is still called as it was
        para_params = inspect.signature(para_fn).parameters if para_fn is not None else {}
        para_opts = {**({"unrelated": extra} if extra is not None and "unrelated" in para_params else {}),
                     **({"exclude": co_erased} if co_erased and "exclude" in para_params else {})}
        para = {} if (spec.target in given or not paraphrase or para_fn is None) else \
            dict(para_fn(spec, axis, label, n, seed=prompt_seed, **para_opts))
        any_paraphrase = any_paraphrase or bool(para)
        every = {**sets, **{PARAPHRASE + k: v for k, v in para.items()}}
        tg = time.perf_counter()
        imgs = {name: {"original": im} for name, im in _generate_sets(pipe, every, seeds, samp, cache, state).items()}
        applied = []
        try:
            for p in patches:
                applied.append(p.apply(pipe, force=force))
            for name, im in _generate_sets(pipe, every, seeds, samp, cache, patched_state).items():
                imgs[name]["patched"] = im
        finally:
            for p in reversed(applied):
                p.revert(pipe)
        t_gen += time.perf_counter() - tg
        sc = {name: {v: _score(judge, imgs[name][v], ps, axis, label) for v in ("original", "patched")}
              for name, ps in every.items()}
        outs: dict[str, dict[str, dict[str, Any]]] = {"templated": {}}
        m = _family_metrics(judge, sets, {k: sc[k] for k in sets}, {k: imgs[k] for k in sets}, fid_features,
                            outs["templated"])
        if ref_files is not None:
            # only the unrelated prompts: what real photographs can stand for (never the target's images)
            if "unrelated" in sets:
                un = imgs["unrelated"]
                m["reference_fid"] = {"prompt_sets": ["unrelated"], **reference_distances(
                    judge, ref_at(*un["original"].shape[1:3]), {v: un[v] for v in ("original", "patched")})}
            else:
                m["reference_fid"] = {"prompt_sets": [], "skipped": "no unrelated prompt set to compare with the "
                                      "reference images"}
        pm = None
        if para:
            outs["paraphrase"] = {}
            pm = _family_metrics(judge, para, {k: sc[PARAPHRASE + k] for k in para},
                                 {k: imgs[PARAPHRASE + k] for k in para}, fid_features, outs["paraphrase"])
        robust = {}
        for atk in attack_objs:
            from ..attacks import attack as run_attack

            sets_ = ("target", "generality") + (("paraphrase/target", "paraphrase/generality") if paraphrase else ())
            r = run_attack(pipe, spec, atk, patch=patches, seeds=a_seeds, judge=judge, cache=cache, sampling=sampling,
                           sets=sets_, force=force)
            robust[r.attack] = {"config": r.config, "success": r.rates(), "cost": r.cost, "record": r.record}
        results.append(ConceptResult(spec.target, axis, label, m, imgs if keep_images else {},
                                     {k: list(v.prompts) for k, v in every.items()}, pm, robust, outs))
    cost = eval_cost(time.perf_counter() - t0, t_gen, cache.hits - hits0, cache.misses - miss0, patches)
    families = {"templated": "the judge's prompt sets" + (" (the world's training caption templates)"
                                                          if isinstance(judge, WorldJudge) else "")}
    if any_paraphrase:
        describe_family = getattr(judge, "paraphrase_family", None)
        families["paraphrase"] = describe_family() if describe_family is not None else \
            f"the {getattr(judge, 'name', 'judge')} judge's paraphrase sets, same seeds"
    settings = {"seeds": [min(seeds), max(seeds), len(seeds)], "seed_list": seeds, "sampling": samp,
                "model": getattr(pipe, "erasekit_source", None), "model_fingerprint": custom or
                get_adapter(pipe).fingerprint(), "state_key": state, "edits": [
                    {"method": p.method, "kind": p.kind, "digest": p.digest} for p in patches],
                "patch_key": patch_key, "judge": judge.describe(), "fid_features": fid_features,
                "prompt_families": families, "prompt_seed": prompt_seed,
                "unrelated_prompts": "given" if extra is not None else "shipped or the concepts' preserve prompts",
                "reference_images": None if ref_files is None else {"folder": str(ref_files[0].parent),
                                                                   "n": len(ref_files)},
                "bootstrap": dict(METHOD)}
    if left_out:
        settings["not_neighbours"] = {"why": "erased by the measured edits too (or named by exclude), so left out "
                                      "of the concept's neighbour prompts (on the world: by axis, also of its "
                                      "unrelated prompts and of the other axes' draws)", "concepts": left_out}
    if attack_objs:
        settings["attacks"] = {"names": [a.name for a in attack_objs], "seeds": a_seeds}
    return EvalResult(results, settings, cost)


def _attacks(attacks: Sequence[Any], judge: Judge) -> list[Any]:
    """Attack objects from names (world settings with the world judge) or objects; duplicates refused."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if not attacks:
        return []
    from ..attacks.run import make_attack

    out = [make_attack(a, world=isinstance(judge, WorldJudge)) for a in attacks]
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"an attack is named twice in {', '.join(names)}; name each once")
    return out
