"""Small model bundles made by the tests themselves (no weights are downloaded, ever)."""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.bundle import BundleManifest, write_bundle
from analysis.mil import build_mil

TINY_GLTRANS = {"in_dim": 1024, "dim": 32, "n_heads": 4, "depth": 1, "n_classes": 2}


def make_tiny_bundle(
    out_dir: Path, *, magnification: float = 5.0, seed: int = 0, is_demo: bool = True
) -> Path:
    """A GLTrans bundle over the seeded fallback ResNet50-trunc (untrained, for plumbing tests)."""
    torch.manual_seed(seed)
    mil = build_mil("gltrans", TINY_GLTRANS)
    manifest = BundleManifest(
        name="tiny-test-model",
        version=f"0.0.{seed}",
        task="lesion-detection",
        classes=["normal", "lesion"],
        magnification=magnification,
        patch_size=int(round(128 / (10 / magnification))),
        encoder={"name": "resnet50_trunc", "params": {"precision": "fp32"}},
        mil={"name": "gltrans", "config": TINY_GLTRANS},
        is_demo=is_demo,
    )
    return write_bundle(out_dir, manifest, mil_state=mil.state_dict())
