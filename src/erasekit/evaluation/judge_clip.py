"""A CLIP zero-shot judge for real checkpoints (artists, objects, celebrities...).

Each evaluated concept becomes one axis whose candidate labels are the target, its neighbours
and the unrelated prompts. An image's probabilities are the softmax of CLIP's scaled cosine
similarities to those labels; a concept label is embedded as the mean of several templates
("a photo of {}"...), an unrelated prompt as itself. Image features (for distances and FID/KID)
are CLIP's normalised image embeddings.

Two back ends load the same family of models:
- ``open_clip``: ``model="open_clip:ViT-L-14/openai"`` (architecture/pretrained tag) or
  ``model="open_clip:ViT-B-32"`` with ``pretrained=PATH`` to a local checkpoint. Needs
  ``pip install 'erasekit[clip]'`` (open-clip-torch, which imports torchvision).
- ``transformers``: a Hugging Face CLIP id or local folder (``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, ModelLoadError
from .judges import Judge, OpenParaphrase

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..concepts import ConceptSpec
    from .prompts import PromptSet

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONCEPT_TEMPLATES = ("a photo of {}", "an image of {}", "a painting of {}", "{}")


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipJudge(OpenParaphrase, Judge):
    """Zero-shot CLIP judge; see the module docstring."""

    name = "clip"

    def __init__(self, model: str | None = None, pretrained: str | None = None, backend: str = "auto",
                 device: str | None = None, batch_size: int = 32) -> None:
        if not model:
            raise InvalidInputError("the clip judge needs a model: --judge-set model=openai/clip-vit-large-patch14 "
                                    "(a Hugging Face id or folder) or model=open_clip:ViT-L-14/openai")
        if backend == "auto":
            backend = "open_clip" if model.startswith("open_clip:") else "transformers"
        if backend not in ("open_clip", "transformers"):
            raise InvalidInputError(f"unknown clip backend {backend!r}; use open_clip or transformers")
        try:
            batch = int(batch_size)
        except (TypeError, ValueError):
            batch = 0
        if batch < 1:
            raise InvalidInputError(f"clip judge batch_size must be a whole number of at least 1, got {batch_size!r}")
        from ..models import check_device

        self.backend, self.model_name, self.batch_size = backend, model, batch
        self.device = torch.device(check_device(device))
        self._axes: dict[str, list[str]] = {}
        self._texts: dict[str, list[list[str]]] = {}
        self._text_emb: dict[str, torch.Tensor] = {}
        if backend == "open_clip":
            self._load_open_clip(model.removeprefix("open_clip:"), pretrained)
        else:
            self._load_transformers(model)
        self.model.eval().to(self.device)
        self.version = f"{backend}:{model}" + (f":{pretrained}" if pretrained else "")

    # -- loading -----------------------------------------------------------------------------
    def _load_open_clip(self, spec: str, pretrained: str | None) -> None:
        try:
            import open_clip
        except Exception as e:  # ImportError, or torchvision failing to import beside this torch
            raise ModelLoadError(f"open-clip-torch cannot be imported ({type(e).__name__}: {e}); install it with "
                                 "pip install 'erasekit[clip]', or use a Hugging Face CLIP (backend=transformers)") from None
        arch, _, tag = spec.partition("/")
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or tag or None)
        except Exception as e:
            raise ModelLoadError(f"open_clip could not build {arch!r} with weights {pretrained or tag!r}: {e}") from None
        self.model = model
        self._tokenize = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))

        def encode_text(texts: list[str]) -> torch.Tensor:
            return model.encode_text(self._tokenize(texts).to(self.device))

        self._encode_text = encode_text
        self._encode_image = model.encode_image
        self._logit_scale = lambda: model.logit_scale.exp()

    def _load_transformers(self, name: str) -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name)
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise ModelLoadError(f"cannot load a CLIP model from {name!r} ({type(e).__name__}); pass a Hugging Face "
                                 "CLIP id or a local folder saved with CLIPModel.save_pretrained") from None
        self.model = model
        self.image_size = int(model.config.vision_config.image_size)
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        max_len = int(model.config.text_config.max_position_embeddings)

        def encode_text(texts: list[str]) -> torch.Tensor:
            ids = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(self.device)
            return _pooled(model.get_text_features(**ids))

        self._encode_text = encode_text
        self._encode_image = lambda px: _pooled(model.get_image_features(pixel_values=px))
        self._logit_scale = lambda: model.logit_scale.exp()

    # -- labels --------------------------------------------------------------------------------
    def axes(self) -> dict[str, list[str]]:
        return {a: list(v) for a, v in self._axes.items()}

    def resolve(self, concept: str) -> tuple[str, str]:
        concept = concept.strip()
        if not concept:
            raise InvalidInputError("empty concept for the clip judge")
        return f"concept:{concept}", concept

    def prepare(self, spec: ConceptSpec) -> tuple[str, str]:
        """Register the concept's axis: target, neighbours and every unrelated prompt it may meet
        (its preserve prompts, or the shipped list); :meth:`prompt_sets` narrows the unrelated
        candidates to the prompts its set holds."""
        from .prompts import DEFAULT_UNRELATED

        axis, label = self.resolve(spec.target)
        self._register(axis, spec, spec.preserve or DEFAULT_UNRELATED)
        return axis, label

    def _register(self, axis: str, spec: ConceptSpec, unrelated: Sequence[str]) -> None:
        from .prompts import open_labels

        labels = open_labels(spec, unrelated)
        prompts = set(unrelated) - {spec.target, *spec.neighbours}
        self._axes[axis] = labels
        self._texts[axis] = [[lab] if lab in prompts else [t.format(lab) for t in CONCEPT_TEMPLATES]
                             for lab in labels]
        self._text_emb.pop(axis, None)

    def prompt_sets(self, spec: ConceptSpec, axis: str, label: str, n: int, *, seed: int = 0,
                    unrelated: Sequence[str] | None = None) -> dict[str, PromptSet]:
        """The open prompt sets; the unrelated prompts each compete with the set's own (n-way),
        not with the whole shipped list."""
        sets = super().prompt_sets(spec, axis, label, n, seed=seed, unrelated=unrelated)
        self._register(axis, spec, list(dict.fromkeys(sets["unrelated"].prompts)))
        return sets

    def add_axis(self, axis: str, labels: list[str], templates: tuple[str, ...] = CONCEPT_TEMPLATES) -> None:
        """Register a closed label set by hand (e.g. a style axis: "Van Gogh", "Monet", "photo")."""
        if len(set(labels)) < 2:
            raise InvalidInputError(f"axis {axis!r} needs at least two distinct labels")
        self._axes[axis] = list(labels)
        self._texts[axis] = [[t.format(lab) for t in templates] for lab in labels]
        self._text_emb.pop(axis, None)

    @torch.no_grad()
    def _label_embeddings(self, axis: str) -> torch.Tensor:
        if axis not in self._text_emb:
            rows = []
            for texts in self._texts[axis]:
                e = F.normalize(self._encode_text(texts).float(), dim=-1).mean(0)
                rows.append(F.normalize(e, dim=-1))
            self._text_emb[axis] = torch.stack(rows)
        return self._text_emb[axis]

    # -- images ----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> CLIP input: resize the short side, centre-crop, normalise."""
        x = ((images.float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        s = self.image_size / min(h, w)
        nh, nw = max(self.image_size, round(h * s)), max(self.image_size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIPScore of each image against its own prompt: ``100 * max(cos(image, text), 0)`` (Hessel et al.,
        2021, with w = 100 as torchmetrics' CLIPScore and the erasure papers' tables)."""
        if len(prompts) != len(images):
            raise InvalidInputError(f"clip_score needs one prompt per image ({len(prompts)} for {len(images)})")
        unique = list(dict.fromkeys(prompts))
        text = torch.cat([F.normalize(self._encode_text(unique[i:i + self.batch_size]).float(), dim=-1).cpu()
                          for i in range(0, len(unique), self.batch_size)])
        row = {p: i for i, p in enumerate(unique)}
        t = text[[row[p] for p in prompts]]
        return 100 * (self.features(images) * t).sum(-1).clamp(min=0)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.preprocess(images[i:i + self.batch_size]).to(self.device)
            out.append(F.normalize(self._encode_image(px).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._axes:
            raise InvalidInputError("the clip judge has no labels yet: call prepare(spec) or add_axis() first")
        feats = self.features(images)
        scale = float(self._logit_scale())
        return {a: (scale * feats @ self._label_embeddings(a).T).softmax(-1) for a in self._axes}

    def describe(self) -> dict[str, Any]:
        labels = hashlib.sha256(repr(sorted(self._texts.items())).encode()).hexdigest()[:12]
        return {"name": self.name, "version": self.version, "backend": self.backend,
                "templates": list(CONCEPT_TEMPLATES), "labels_digest": labels, "axes": self.axes()}
