"""The embedded world: a procedural domain of captioned shapes with its own trained model."""

from .vocab import AXES, BACKGROUNDS, COLOURS, CONCEPTS, SHAPES, TEXTURES, Labels, caption

__all__ = ["AXES", "BACKGROUNDS", "COLOURS", "CONCEPTS", "SHAPES", "TEXTURES", "Labels", "caption"]
