"""User-facing errors: one line each, naming the fix."""

from __future__ import annotations


class ErasekitError(Exception):
    """Base class of every error erasekit shows to a user as one line."""


class ModelLoadError(ErasekitError):
    """A model id or folder could not be loaded."""


class InvalidInputError(ErasekitError):
    """An argument or input file is not acceptable."""


class OutputPathError(ErasekitError):
    """An output path cannot be written."""
