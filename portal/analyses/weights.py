"""Whether a registered model version's weights can be trusted (imports no models, so the
``ModelVersion`` model and the lifecycle rules can both use it)."""

from __future__ import annotations

from pathlib import Path

from analysis.bundle import weights_sha256


class ActivationError(Exception):
    """A model cannot be activated (or rolled back); the message says why and what to do."""


def weights_problem(model) -> str | None:
    """Why ``model``'s weights cannot be trusted, or None when every check passes.

    The bundle must exist, every weight file must match the checksum in its manifest, and the
    version's recorded SHA-256 must be that of the weights (or of the manifest, which hashes
    them), so a weights file swapped after registration is caught.
    """
    from analysis.bundle import bundle_sha256, verify_bundle
    from analysis.errors import AnalysisError

    if not model.sha256:
        return "it has no recorded SHA-256 of its weights; register the bundle again"
    bundle = Path(model.bundle_path or "-")
    if not bundle.is_dir() or not list(bundle.glob("*.safetensors")):
        return f"its weights are missing (no safetensors files in {bundle.name or 'its bundle'})"
    try:
        verify_bundle(bundle)
    except AnalysisError as exc:
        return f"its weights do not verify ({str(exc).split(': ', 1)[-1]})"
    if model.sha256 not in (weights_sha256(bundle), bundle_sha256(bundle)):
        return (
            "its weights' SHA-256 does not match the one recorded at registration "
            "(the files were replaced); register the new weights as a new version"
        )
    return None
