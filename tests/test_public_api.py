"""``analysis`` re-exports its public API; importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import analysis
from analysis import bundle, errors, pipeline, slides, tissue


def test_the_public_names_are_the_library_objects():
    assert analysis.open_slide is slides.open_slide
    assert analysis.SlideCache is slides.SlideCache
    assert analysis.patch_grid is tissue.patch_grid
    assert analysis.predict_slide is pipeline.predict_slide
    assert analysis.load_bundle is bundle.load_bundle
    assert analysis.NoTissueError is errors.NoTissueError
    assert set(analysis.__all__) <= set(dir(analysis))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        analysis.nothing_here  # noqa: B018


def test_importing_the_package_loads_neither_torch_nor_openslide():
    code = "import sys, analysis; print(sorted({'torch', 'openslide'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
