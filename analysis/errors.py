"""One base error with specific subclasses; every message says what failed, where, and what to do."""

from __future__ import annotations


class AnalysisError(Exception):
    """Base of every error the analysis library raises on purpose."""


class UnsupportedSlideError(AnalysisError):
    """The file is not a whole-slide image any reader here understands."""


class CorruptSlideError(AnalysisError):
    """The file claims a known format but its contents cannot be read."""


class MissingScaleError(AnalysisError):
    """The slide carries neither an mpp nor an objective power; the caller must supply an mpp."""


class MagnificationUnavailableError(AnalysisError):
    """The slide is coarser than the requested magnification (upsampling would invent pixels)."""


class NoTissueError(AnalysisError):
    """The slide holds no patch with enough tissue to analyse."""


class BundleError(AnalysisError):
    """A model bundle is missing, malformed, or its weights do not match its manifest."""
