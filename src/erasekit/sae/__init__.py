"""Sparse autoencoders on diffusion-model activations: a TopK SAE, activation collection through the
sampling loop, and training."""

from .collect import (
           WORLD_SITE,
           Activations,
           CaptureHook,
           collect,
           collect_text,
           is_text_site,
           to_tokens,
)
from .model import TopKSAE, load_record, metrics
from .train import Checkpoint, SAEConfig, collect_site, discard, fit, train_sae

__all__ = [
           "WORLD_SITE",
           "Activations",
           "CaptureHook",
           "Checkpoint",
           "SAEConfig",
           "TopKSAE",
           "collect",
           "collect_site",
           "collect_text",
           "discard",
           "fit",
           "is_text_site",
           "load_record",
           "metrics",
           "to_tokens",
           "train_sae",
]
