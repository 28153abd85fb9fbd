"""Multiple-instance learning models behind one interface.

Every model takes one bag (one slide) per call::

    logits, instance_scores = model(features, coords)

``features`` is (N, D) float, ``coords`` is (N, 2) integer grid cells as (row, col) on the
slide's patch grid (any offset; models shift the minimum to 0). A leading batch dimension of
1 is accepted, (1, N, D) and (1, N, 2), and then kept on the logits: (1, C) instead of (C,).
``instance_scores`` is always (N,), in the order the instances were given. Only GLTrans uses
the grid positions; the baselines accept and ignore them (TransMIL positions follow the
sequence order, as in its paper).
"""

from analysis.mil.abmil import ABMIL, ABMILConfig
from analysis.mil.clam import CLAMSB, CLAMConfig
from analysis.mil.gltrans import GLTrans, GLTransConfig
from analysis.mil.registry import (
    MIL_MODELS,
    build_mil,
    mil_config_from_dict,
    mil_config_to_dict,
    mil_name,
)
from analysis.mil.transmil import TransMIL, TransMILConfig

__all__ = [
    "ABMIL",
    "ABMILConfig",
    "CLAMConfig",
    "CLAMSB",
    "GLTrans",
    "GLTransConfig",
    "MIL_MODELS",
    "TransMIL",
    "TransMILConfig",
    "build_mil",
    "mil_config_from_dict",
    "mil_config_to_dict",
    "mil_name",
]
