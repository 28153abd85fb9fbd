"""LowMag analysis: the science as a plain Python library (never imports Django).

The public API, importable from the package itself (the errors at once; the rest on first use,
so ``import analysis`` stays cheap and loads neither torch nor openslide)::

    import analysis

    with analysis.open_slide("case.svs") as slide:
        grid = analysis.patch_grid(slide)  # 128 µm cells on tissue, level-0 coordinates
    bundle = analysis.load_bundle("models/gltrans-demo")
    result = analysis.predict_slide(bundle, "case.svs")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from analysis.errors import (
    AnalysisError,
    BundleError,
    CorruptSlideError,
    MagnificationUnavailableError,
    MissingScaleError,
    NoTissueError,
    UnsupportedSlideError,
)

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "open_slide": "analysis.slides",
    "Slide": "analysis.slides",
    "SlideCache": "analysis.slides",
    "SlideNotFoundError": "analysis.slides",
    "patch_grid": "analysis.tissue",
    "tissue_mask": "analysis.tissue",
    "PatchGrid": "analysis.tissue",
    "predict_slide": "analysis.pipeline",
    "SlidePrediction": "analysis.pipeline",
    "load_bundle": "analysis.bundle",
    "LoadedBundle": "analysis.bundle",
    "BundleManifest": "analysis.bundle",
}

if TYPE_CHECKING:
    from analysis.bundle import BundleManifest, LoadedBundle, load_bundle
    from analysis.pipeline import SlidePrediction, predict_slide
    from analysis.slides import Slide, SlideCache, SlideNotFoundError, open_slide
    from analysis.tissue import PatchGrid, patch_grid, tissue_mask


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AnalysisError",
    "BundleError",
    "BundleManifest",
    "CorruptSlideError",
    "LoadedBundle",
    "MagnificationUnavailableError",
    "MissingScaleError",
    "NoTissueError",
    "PatchGrid",
    "Slide",
    "SlideCache",
    "SlideNotFoundError",
    "SlidePrediction",
    "UnsupportedSlideError",
    "__version__",
    "load_bundle",
    "open_slide",
    "patch_grid",
    "predict_slide",
    "tissue_mask",
]
