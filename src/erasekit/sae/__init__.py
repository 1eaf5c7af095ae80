"""Sparse autoencoders on diffusion-model activations: a TopK SAE, activation collection through the
sampling loop, and training."""

from .collect import WORLD_SITE, Activations, CaptureHook, collect, to_tokens
from .model import TopKSAE, load_record, metrics
from .train import SAEConfig, fit, train_sae

__all__ = [
           "WORLD_SITE",
           "Activations",
           "CaptureHook",
           "SAEConfig",
           "TopKSAE",
           "collect",
           "fit",
           "load_record",
           "metrics",
           "to_tokens",
           "train_sae",
]
