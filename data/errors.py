"""Errors raised by the data layer; all are ValueError subclasses whose message names the file."""

from __future__ import annotations


class DataError(ValueError):
    """Base class for every bad-input error of the data layer."""


class AnnotationError(DataError):
    """An annotation file is missing, malformed or inconsistent (message names the file)."""


class UnknownClassError(AnnotationError):
    """An annotation names a class that is not in the configured class list."""


class ImageReadError(DataError):
    """An image file is missing, cannot be decoded, or does not match its annotated size."""


class SplitFileError(DataError):
    """A split list (ImageSets/Main/<split>.txt or a labelImg split file) is missing or inconsistent."""
