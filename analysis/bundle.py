"""The model bundle: what a trained model is on disk (SPEC section 7).

A bundle is one directory (or a ``.zip`` of one) holding ``manifest.json`` and weights as
safetensors: ``encoder.safetensors`` (omitted when the encoder is an untrained,
seed-defined fallback) and ``mil.safetensors``. Weights are never unpickled. The manifest
records every file's SHA-256 and loading verifies them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analysis.errors import BundleError
from analysis.files import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FIELDS = ("name", "version", "task", "classes", "magnification", "encoder", "mil")


@dataclass
class BundleManifest:
    name: str
    version: str
    task: str  # what the model answers, e.g. "lesion-detection"
    classes: list[str]  # index -> class name, in logit order
    magnification: float  # the input magnification the encoder was aligned to
    encoder: dict[str, Any]  # {"name", "weights", "sha256", "params": {...}}
    mil: dict[str, Any]  # {"name", "config", "weights", "sha256"}
    patch_um: float = 128.0
    patch_size: int = 64  # pixels at `magnification`
    maga: dict[str, Any] | None = None  # MAGA settings the encoder was trained with
    metrics: dict[str, Any] = field(default_factory=dict)  # cross-validation summary
    is_demo: bool = False  # demo models are labelled "not for diagnosis" everywhere
    description: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}" + (
            " (demo model, not for diagnosis)" if self.is_demo else ""
        )


def weights_sha256(bundle_dir: str | Path) -> str:
    """One SHA-256 over the bundle's ``*.safetensors`` files in name order (name, then bytes):
    what ``register_model`` records and the portal checks before a model may be active."""
    digest = hashlib.sha256()
    for file in sorted(Path(bundle_dir).glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def write_bundle(
    out_dir: str | Path,
    manifest: BundleManifest,
    *,
    mil_state: dict,
    encoder_state: dict | None = None,
    as_zip: bool = False,
) -> Path:
    """Write weights (safetensors) and the manifest; returns the bundle directory or zip."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mil_path = out_dir / "mil.safetensors"
    save_file({k: v.contiguous() for k, v in mil_state.items()}, str(mil_path))
    manifest.mil = {**manifest.mil, "weights": mil_path.name, "sha256": sha256_file(mil_path)}
    if encoder_state is not None:
        enc_path = out_dir / "encoder.safetensors"
        save_file({k: v.contiguous() for k, v in encoder_state.items()}, str(enc_path))
        manifest.encoder = {
            **manifest.encoder,
            "weights": enc_path.name,
            "sha256": sha256_file(enc_path),
        }
    if not manifest.created_at:
        manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    (out_dir / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
    if not as_zip:
        return out_dir
    zip_path = out_dir.with_suffix(".zip")
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
        for item in sorted(out_dir.iterdir()):
            archive.write(item, item.name)
    return zip_path


def _manifest_from_dict(raw: dict, source: Path) -> BundleManifest:
    missing = [key for key in REQUIRED_FIELDS if key not in raw]
    if missing:
        raise BundleError(f"{source}: manifest.json lacks {', '.join(missing)}")
    if int(raw.get("format_version", 1)) > FORMAT_VERSION:
        raise BundleError(
            f"{source}: bundle format {raw['format_version']} is newer than this LowMag "
            f"understands ({FORMAT_VERSION}); upgrade LowMag"
        )
    known = set(BundleManifest.__dataclass_fields__)
    manifest = BundleManifest(**{k: v for k, v in raw.items() if k in known})
    if not manifest.classes or len(set(manifest.classes)) != len(manifest.classes):
        raise BundleError(f"{source}: manifest classes must be a non-empty list of unique names")
    return manifest


def _safe_extract(zip_path: Path, dest: Path) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            name = Path(info.filename)
            if name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
                raise BundleError(f"{zip_path}: unexpected entry {info.filename!r} in bundle zip")
        archive.extractall(dest)


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle directory, extracting a ``.zip`` bundle into a cache folder beside the temp dir."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model bundle {path} not found")
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise BundleError(f"{path} is not a model bundle: no {MANIFEST}")
        return path
    if zipfile.is_zipfile(path):
        digest = sha256_file(path)[:16]
        dest = Path(tempfile.gettempdir()) / "lowmag-bundles" / digest
        if not (dest / MANIFEST).is_file():
            staging = Path(tempfile.mkdtemp(prefix="bundle-"))
            try:
                _safe_extract(path, staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                staging.rename(dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return dest
    raise BundleError(f"{path} is neither a bundle directory nor a bundle .zip")


def load_manifest(path: str | Path) -> BundleManifest:
    bundle_dir = resolve_bundle_dir(path)
    try:
        raw = json.loads((bundle_dir / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest.json must hold an object")
    return _manifest_from_dict(raw, Path(path))


def verify_bundle(path: str | Path) -> BundleManifest:
    """Load the manifest and check every weight file's SHA-256 against it."""
    bundle_dir = resolve_bundle_dir(path)
    manifest = load_manifest(bundle_dir)
    for part in (manifest.encoder, manifest.mil):
        weights = part.get("weights")
        if not weights:
            continue
        file = bundle_dir / weights
        if not file.is_file():
            raise BundleError(f"{path}: weights file {weights} named in the manifest is missing")
        if part.get("sha256") and sha256_file(file) != part["sha256"]:
            raise BundleError(
                f"{path}: {weights} does not match its checksum in the manifest "
                "(the bundle is damaged or was modified); rebuild or re-copy it"
            )
    return manifest


def bundle_sha256(path: str | Path) -> str:
    """One checksum identifying the bundle: the hash of its manifest (which hashes the weights)."""
    return sha256_file(resolve_bundle_dir(path) / MANIFEST)


@dataclass
class LoadedBundle:
    manifest: BundleManifest
    path: Path
    sha256: str
    encoder: Any  # analysis.encoders.Encoder
    mil: Any  # torch.nn.Module in eval mode


def load_bundle(
    path: str | Path, device: str | None = None, precision: str | None = None
) -> LoadedBundle:
    """Verify and load a bundle's encoder and MIL model, ready for ``analysis.pipeline``.

    Both models go to ``device`` (default: ``analysis.devices.resolve_device``).
    """
    from safetensors.torch import load_file

    from analysis.devices import resolve_device
    from analysis.encoders import build_encoder
    from analysis.mil import build_mil

    device = resolve_device(device)  # explicit, else $LOWMAG_DEVICE, else cuda when present
    bundle_dir = resolve_bundle_dir(path)
    manifest = verify_bundle(bundle_dir)
    enc_weights = manifest.encoder.get("weights")
    params = {"precision": "auto", **manifest.encoder.get("params", {})}
    if precision is not None:
        params["precision"] = precision
    encoder = build_encoder(
        manifest.encoder["name"],
        weights=str(bundle_dir / enc_weights) if enc_weights else None,
        device=device,
        **params,
    )
    try:
        mil = build_mil(manifest.mil["name"], manifest.mil.get("config", {}))
        mil.load_state_dict(load_file(str(bundle_dir / manifest.mil["weights"])), strict=True)
    except (RuntimeError, ValueError) as exc:
        raise BundleError(f"{path}: MIL weights do not fit {manifest.mil['name']}: {exc}") from exc
    mil.eval().to(encoder.device)
    return LoadedBundle(manifest, bundle_dir, bundle_sha256(bundle_dir), encoder, mil)


def build_bundle_from_features(
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    task: str,
    magnification: float,
    encoder_name: str = "resnet50_trunc",
    encoder_weights: str | Path | None = None,
    mil_name: str = "gltrans",
    mil_config: dict | None = None,
    epochs: int = 30,
    seed: int = 0,
    val_fraction: float = 0.2,
    maga: dict | None = None,
    metrics: dict | None = None,
    is_demo: bool = False,
    as_zip: bool = False,
) -> Path:
    """Train a MIL model on all labelled slides (a patient-level validation split picks the
    epoch) and write it with its encoder as a bundle."""
    import numpy as np

    from analysis.commands.crossval import load_bags
    from analysis.encoders import read_state_dict
    from analysis.train import TrainConfig, train_model

    bags, classes = load_bags(Path(features_dir), Path(labels_csv))
    patients = sorted({bag.patient_id for bag in bags})
    if len(patients) < 2:
        raise BundleError("building a bundle needs slides from at least two patients")
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(len(patients) * val_fraction)))
    val_patients = set(rng.permutation(patients)[:n_val].tolist())
    train_bags = [b for b in bags if b.patient_id not in val_patients]
    val_bags = [b for b in bags if b.patient_id in val_patients]
    result = train_model(
        mil_name, mil_config, train_bags, val_bags, TrainConfig(epochs=epochs, seed=seed)
    )
    encoder_state = read_state_dict(encoder_weights) if encoder_weights else None
    manifest = BundleManifest(
        name=name,
        version=version,
        task=task,
        classes=list(classes),
        magnification=float(magnification),
        patch_size=int(round(128.0 * magnification / 10.0)),
        encoder={"name": encoder_name, "params": {}},
        mil={"name": mil_name, "config": result.mil_config},
        maga=maga,
        metrics={
            **(metrics or {}),
            "validation": {
                k: (None if isinstance(v, float) and v != v else v)  # NaN -> null (strict JSON)
                for k, v in result.best_val.items()
            },
            "best_epoch": result.best_epoch,
            "n_train_slides": len(train_bags),
            "n_val_slides": len(val_bags),
        },
        is_demo=is_demo,
    )
    return write_bundle(
        out_dir,
        manifest,
        mil_state=result.model.state_dict(),
        encoder_state=encoder_state,
        as_zip=as_zip,
    )
