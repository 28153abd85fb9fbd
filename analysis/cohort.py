"""A cohort's patch features, one slide at a time: idempotent, resumable, fan-out friendly.

``extract_slide`` writes ``<out>/<slide id>.h5`` (atomically: a temp file renamed at the end)
and returns at once when that file already holds features of the same slide file, encoder,
weights and magnification, so a re-delivered task or a re-run of a half-done cohort only does
the slides still missing. Encoders stay loaded per process (a worker keeps its model warm).

``extract_cohort`` runs the slides in this process; the portal's ``extract_cohort`` management
command sends one ``gpu``-queue Celery task per slide instead, so N workers extract N slides at
once (and runs the same function in-process without Redis).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from analysis.errors import AnalysisError

_encoders: dict[tuple, Any] = {}
_encoders_lock = threading.Lock()


@dataclass(frozen=True)
class ExtractSettings:
    mag: float = 5.0
    encoder: str = "resnet50_trunc"
    weights: str | None = None  # safetensors/.pth; None: the seeded fallback
    precision: str = "auto"
    device: str | None = None  # None: analysis.devices.resolve_device
    batch_size: int = 64
    min_tissue: float = 0.25
    mpp: float | None = None  # level-0 µm/px for slides that carry none

    def identity(self, slide_path: Path) -> dict[str, str]:
        """What an existing file must match to be reused (stored as HDF5 attributes)."""
        stat = slide_path.stat()
        weights = Path(self.weights) if self.weights else None
        weights_id = f"{weights.name}:{weights.stat().st_size}" if weights else "seeded-init"
        return {
            "source": f"{slide_path.name}:{stat.st_size}:{stat.st_mtime_ns}",
            "extract": f"{self.encoder}|{weights_id}|{self.mag:g}x|{self.min_tissue:g}",
        }


def slide_id_of(path: str | Path) -> str:
    return Path(path).stem


def output_path(slide_path: str | Path, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{slide_id_of(slide_path)}.h5"


def is_done(slide_path: str | Path, out_dir: str | Path, settings: ExtractSettings) -> bool:
    """True when the slide's feature file exists and was made from this file with these settings."""
    import h5py

    target = output_path(slide_path, out_dir)
    if not target.is_file():
        return False
    wanted = settings.identity(Path(slide_path))
    try:
        with h5py.File(target, "r") as f:
            return all(str(f.attrs.get(k, "")) == v for k, v in wanted.items())
    except OSError:
        return False  # unreadable (e.g. truncated by a crash): extract again


def _encoder(settings: ExtractSettings):
    from analysis.devices import resolve_device
    from analysis.encoders import build_encoder

    device = resolve_device(settings.device)
    key = (settings.encoder, settings.weights, settings.precision, device, settings.batch_size)
    with _encoders_lock:
        if key not in _encoders:
            _encoders[key] = build_encoder(
                settings.encoder,
                settings.weights,
                precision=settings.precision,
                device=device,
                batch_size=settings.batch_size,
            )
        return _encoders[key]


def extract_slide(
    slide_path: str | Path, out_dir: str | Path, settings: ExtractSettings | None = None
) -> dict[str, Any]:
    """Features of one slide -> ``<out_dir>/<slide id>.h5``; skips a slide already done."""
    import h5py

    from analysis.features import extract_features, save_h5
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    settings = settings or ExtractSettings()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    if not slide_path.is_file():
        raise AnalysisError(f"slide {slide_path} does not exist")
    target = output_path(slide_path, out_dir)
    if is_done(slide_path, out_dir, settings):
        return {"slide": str(slide_path), "features": str(target), "status": "exists"}
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = _encoder(settings)
    with open_slide(slide_path, mpp=settings.mpp) as slide:
        grid = patch_grid(slide, min_tissue=settings.min_tissue)
    features = extract_features(
        slide_path, grid, encoder, settings.mag, settings.batch_size, slide_mpp=settings.mpp
    )
    tmp = target.with_name(target.stem + ".partial.h5")
    save_h5(tmp, features)
    with h5py.File(tmp, "a") as f:
        for key, value in settings.identity(slide_path).items():
            f.attrs[key] = value
    tmp.replace(target)  # the file appears complete or not at all
    return {
        "slide": str(slide_path),
        "features": str(target),
        "status": "extracted",
        "patches": len(features),
    }


def extract_cohort(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    settings: ExtractSettings | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Every slide in this process, in order; slides already done are skipped."""
    results = []
    for i, path in enumerate(slides, 1):
        result = extract_slide(path, out_dir, settings)
        log(f"[{i}/{len(slides)}] {Path(path).name}: {result['status']}")
        results.append(result)
    return results


def settings_to_dict(settings: ExtractSettings) -> dict[str, Any]:
    return asdict(settings)
