"""Paths of the shipped world model and classifier."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def model_path() -> Path:
    """Folder of the embedded world's diffusers pipeline."""
    return ASSETS / "world-model"


def classifier_path() -> Path:
    """The shipped concept classifier's safetensors."""
    return ASSETS / "classifier.safetensors"
