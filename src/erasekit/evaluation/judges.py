"""Judges read concepts back from images. A judge is an interface; judges register by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..concepts import ConceptSpec
    from .prompts import PromptSet


class Judge:
    """Reads concepts from images in [-1, 1], (N, 3, H, W).

    A concept resolves to ``(axis, label)``; ``probs`` gives per-axis class probabilities and
    ``features`` an embedding used for perceptual distances and FID/KID.
    """

    name: ClassVar[str]
    version: str = "0"
    #: whether ``features`` gives an embedding (a detector's does not): FID/KID in the judge's space need one
    image_features: ClassVar[bool] = True

    def axes(self) -> dict[str, list[str]]:  # pragma: no cover - interface
        raise NotImplementedError

    def resolve(self, concept: str) -> tuple[str, str]:  # pragma: no cover - interface
        raise NotImplementedError

    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def prepare(self, spec: "ConceptSpec") -> tuple[str, str]:
        """Make ready to judge ``spec`` (an open-vocabulary judge registers its labels here)."""
        return self.resolve(spec.target)

    #: whether the "unrelated" set is made of free-text prompts (``--unrelated-file``) this judge
    #: can score; the world judge reads the world's other axes instead
    reads_unrelated_prompts: ClassVar[bool] = True

    def prompt_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                    unrelated: Sequence[str] | None = None) -> dict[str, PromptSet]:
        """The target / generality / neighbours / unrelated prompts this judge can score;
        ``unrelated`` replaces the shipped unrelated prompts, sampled by ``seed``."""
        from .prompts import open_prompt_sets

        return open_prompt_sets(spec, axis, n, seed=seed, unrelated=unrelated)

    def paraphrase_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                        unrelated: Sequence[str] | None = None) -> dict[str, PromptSet]:
        """The same four sets in a grammar disjoint from the erase templates (and, for the world, from the
        model's training captions), where this judge has one; {} where not (a judge of its own axes
        defines its own). The CLIP and NudeNet judges use :class:`OpenParaphrase`."""
        return {}

    def paraphrase_family(self) -> str:
        """What the paraphrase family is, as metrics.json and the report record it."""
        return f"the {self.name} judge's paraphrase sets, same seeds"


class OpenParaphrase:
    """The paraphrase family of open-vocabulary judges: :func:`~erasekit.evaluation.prompts.open_prompt_sets`'
    phrases and unrelated prompts in the sentence frames of :data:`~erasekit.evaluation.prompts.OPEN_FRAMES`."""

    def paraphrase_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                        unrelated: Sequence[str] | None = None) -> dict[str, PromptSet]:
        from .prompts import open_paraphrase_sets

        return open_paraphrase_sets(spec, axis, n, seed=seed, unrelated=unrelated)

    def paraphrase_family(self) -> str:
        from .prompts import OPEN_FRAMES, OPEN_GRAMMAR_VERSION

        return (f"erasekit.evaluation.prompts.OPEN_FRAMES v{OPEN_GRAMMAR_VERSION}: {len(OPEN_FRAMES)} sentence frames "
                "disjoint from the templated sets and every method's and attack's default templates, same seeds")


class WorldJudge(Judge):
    """The embedded world's calibrated concept classifier."""

    name = "world-classifier"

    def __init__(self, path: str | None = None) -> None:
        from ..world.classifier import load_classifier
        from ..world.assets import classifier_path

        self.model = load_classifier(path)
        import hashlib
        from pathlib import Path

        p = Path(path) if path else classifier_path()
        self.version = hashlib.sha256(p.read_bytes()).hexdigest()[:12]

    def axes(self) -> dict[str, list[str]]:
        from ..world.vocab import AXES, CONCEPTS

        return {a: list(CONCEPTS[a]) for a in AXES}

    def resolve(self, concept: str) -> tuple[str, str]:
        from ..world.vocab import find_axis

        hit = find_axis(concept.strip().lower())
        if hit is None:
            known = "; ".join(f"{a}: {', '.join(v)}" for a, v in self.axes().items())
            raise InvalidInputError(f"the {self.name} judge cannot recognise {concept!r}; it knows {known}")
        return hit

    reads_unrelated_prompts = False

    def prompt_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                    unrelated: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, PromptSet]:
        """``exclude``: other concepts the measured edits erase, left out of the neighbours and the unrelated
        prompts (:func:`~erasekit.evaluation.prompts.world_prompt_sets`)."""
        from .prompts import world_prompt_sets

        return world_prompt_sets(spec, axis, label, n, seed, exclude=exclude)

    def paraphrase_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                        unrelated: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, PromptSet]:
        from .prompts import world_prompt_sets

        return world_prompt_sets(spec, axis, label, n, seed, family="paraphrase", exclude=exclude)  # its own axes

    def paraphrase_family(self) -> str:
        from .paraphrase import FRAMES, GRAMMAR_VERSION

        return (f"erasekit.evaluation.paraphrase v{GRAMMAR_VERSION}: {len(FRAMES)} sentence frames "
                "disjoint from the training captions and the erase templates, same seeds")

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.predict_proba(images)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        from ..world.classifier import to_input

        self.model.eval()
        return self.model.embed(to_input(images))


from .judge_clip import ClipJudge  # noqa: E402  (they subclass Judge, defined above)
from .judge_nudenet import NudeNetJudge  # noqa: E402

JUDGES: dict[str, type[Judge]] = {}
for _j in (WorldJudge, ClipJudge, NudeNetJudge):
    if _j.name in JUDGES:
        raise RuntimeError(f"two judges are registered as {_j.name!r}")
    JUDGES[_j.name] = _j


def get_judge(name: str = "world-classifier", **kwargs: Any) -> Judge:
    """A registered judge by name, built with ``kwargs`` (unknown options are a one-line error)."""
    import inspect

    if name not in JUDGES:
        raise InvalidInputError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    cls = JUDGES[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = [k for k in kwargs if k not in known]
    if bad:
        raise InvalidInputError(f"judge {name} has no option {bad[0]!r}; its options: {', '.join(known) or 'none'}")
    return cls(**kwargs)
