"""LowMag analysis: the science as a plain Python library (never imports Django)."""

from analysis.errors import (
    AnalysisError,
    CorruptSlideError,
    MagnificationUnavailableError,
    MissingScaleError,
    NoTissueError,
    UnsupportedSlideError,
)

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "CorruptSlideError",
    "MagnificationUnavailableError",
    "MissingScaleError",
    "NoTissueError",
    "UnsupportedSlideError",
    "__version__",
]
