"""Build MIL models by name from plain dictionaries (what a bundle manifest or a CLI stores)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from analysis.mil.abmil import ABMIL, ABMILConfig
from analysis.mil.clam import CLAMSB, CLAMConfig
from analysis.mil.gltrans import GLTrans, GLTransConfig
from analysis.mil.transmil import TransMIL, TransMILConfig

MIL_MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "gltrans": (GLTrans, GLTransConfig),
    "abmil": (ABMIL, ABMILConfig),
    "clam_sb": (CLAMSB, CLAMConfig),
    "transmil": (TransMIL, TransMILConfig),
}


def _entry(name: str) -> tuple[type[nn.Module], type]:
    try:
        return MIL_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown MIL model {name!r}; choose one of {', '.join(sorted(MIL_MODELS))}"
        ) from None


def mil_config_from_dict(name: str, config: dict[str, Any] | None = None) -> Any:
    """The typed config of model ``name``; unknown keys raise ValueError."""
    config_cls = _entry(name)[1]
    known = {field.name for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(config or {}) - known)
    if unknown:
        raise ValueError(
            f"unknown {name} config keys {unknown}; known keys: {', '.join(sorted(known))}"
        )
    return config_cls(**(config or {}))


def build_mil(name: str, config: dict[str, Any] | Any | None = None) -> nn.Module:
    """A freshly initialised model; ``config`` is a dict or the model's config dataclass."""
    model_cls, config_cls = _entry(name)
    if not isinstance(config, config_cls):
        config = mil_config_from_dict(name, config)
    return model_cls(config)


def mil_config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a model config dataclass (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }


def mil_name(model: nn.Module) -> str:
    """Registry name of a built model (``gltrans``, ``abmil``, ``clam_sb``, ``transmil``)."""
    for name, (model_cls, _) in MIL_MODELS.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered MIL model")
