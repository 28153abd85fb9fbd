"""Patch features of a slide: extraction (reading overlapped with encoding) and CLAM-style HDF5.

The HDF5 layout is CLAM's (``features`` (N, D) float32 and ``coords`` (N, 2) level-0 x, y) plus
``grid_rc`` (N, 2) and file attributes ``mag``, ``mpp``, ``patch_size``, ``l0_patch_size``,
``encoder``. ``load_h5`` also reads plain CLAM files (only ``features`` and ``coords``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.encoders import Encoder
from analysis.errors import AnalysisError
from analysis.slides import Slide, mpp_for_magnification, open_slide, patch_size_px
from analysis.tissue import PatchGrid

_DONE = object()


@dataclass
class Features:
    """Embeddings of one slide's grid cells, in grid order."""

    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    grid_rc: np.ndarray  # (N, 2) int64, (row, col)
    mag: float | None = None  # magnification the patches were read at
    mpp: float | None = None  # µm/px of the patches (10 / mag)
    patch_size: int | None = None  # patch side in pixels at ``mag``
    l0_patch_size: float | None = None  # patch side in level-0 pixels
    encoder: str = ""

    def __len__(self) -> int:
        return len(self.features)


def extract_features(
    slide_path: str | Path | Slide,
    grid: PatchGrid,
    encoder: Encoder,
    mag: float,
    batch_size: int = 64,
    workers: int = 2,
    slide_mpp: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Encode every grid cell read at ``mag``; a reader thread keeps the encoder fed.

    ``slide_path`` is a path or an already open ``Slide`` (left open). ``slide_mpp`` supplies
    the level-0 scale for slides that carry none (as ``open_slide``); ``on_batch(n_done)``
    reports progress after each encoded batch. Patches go to the encoder's device batch by
    batch and the embeddings come back to the CPU (``Encoder.embed``).
    """
    n = len(grid.l0_xy)
    features = np.zeros((n, encoder.dim), np.float32)
    opened: contextlib.AbstractContextManager[Slide] = (
        contextlib.nullcontext(slide_path)
        if isinstance(slide_path, Slide)
        else open_slide(slide_path, mpp=slide_mpp)
    )
    with opened as slide:
        batches = slide.iter_patch_batches(
            grid.l0_xy, mag, batch_size=batch_size, patch_um=grid.patch_um, workers=workers
        )
        with contextlib.closing(_prefetch(batches, depth=2)) as prefetched:
            done = 0
            for indices, patches in prefetched:
                features[indices] = encoder.embed(patches)  # (B, D)
                done += len(indices)
                if on_batch:
                    on_batch(done)
    return Features(
        features=features,
        coords=np.asarray(grid.l0_xy, np.int64),
        grid_rc=np.asarray(grid.grid_rc, np.int64),
        mag=float(mag),
        mpp=mpp_for_magnification(mag),
        patch_size=patch_size_px(mag, grid.patch_um),
        l0_patch_size=float(grid.l0_patch_size),
        encoder=encoder.name,
    )


def _prefetch(iterator: Iterator, depth: int) -> Generator:
    """Run ``iterator`` in a thread, ``depth`` items ahead; its exceptions re-raise here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
            items.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)

    thread = threading.Thread(target=produce, name="patch-reader", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def save_h5(path: str | Path, features: Features) -> Path:
    """Write ``features`` as a CLAM-compatible HDF5 file (written to a temp name, then renamed)."""
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features.features, np.float32))
        coords = f.create_dataset("coords", data=np.asarray(features.coords, np.int64))
        f.create_dataset("grid_rc", data=np.asarray(features.grid_rc, np.int64))
        attrs = {
            "mag": features.mag,
            "mpp": features.mpp,
            "patch_size": features.patch_size,
            "l0_patch_size": features.l0_patch_size,
        }
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
        f.attrs["encoder"] = features.encoder
        if features.l0_patch_size is not None:
            coords.attrs["patch_size"] = features.l0_patch_size  # CLAM reads it from here
    tmp.replace(path)
    return path


class H5Features:
    """A slide's ``features`` dataset, read from its HDF5 file each time it is used.

    Behaves like the (N, D) array where training needs it (``shape``, ``len``,
    ``np.asarray``), so a cohort's bags cost only their file names until a bag is trained on.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.shape = shape
        self.ndim = len(shape)
        self.reads = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001 - numpy protocol
        import h5py

        self.reads += 1
        with h5py.File(self.path, "r") as f:
            feats = np.asarray(f["features"][()], dtype or np.float32)
        return feats[0] if feats.ndim == 3 and feats.shape[0] == 1 else feats


def load_h5(path: str | Path, lazy: bool = False) -> Features:
    """Read our files or CLAM's; without ``grid_rc`` it is derived from the coordinates.

    ``lazy``: ``features`` is an ``H5Features`` read from the file only when used.
    Level-0 patch spacing: our ``l0_patch_size`` attribute, else CLAM's ``coords`` attributes,
    where ``patch_size`` counts pixels at ``patch_level`` and ``downsample`` converts them to
    level 0.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise AnalysisError(
                    f"{path} has no 'features' and 'coords' datasets: not a patch-feature file"
                )
            shape = tuple(int(n) for n in f["features"].shape)
            if len(shape) == 3 and shape[0] == 1:  # some CLAM variants store (1, N, D)
                shape = shape[1:]
            feats: Any = (
                H5Features(path, shape) if lazy else np.asarray(f["features"][()], np.float32)
            )
            coords = np.asarray(f["coords"][()], np.int64)
            attrs = dict(f.attrs)
            l0_patch = attrs.get("l0_patch_size")
            if l0_patch is None:
                l0_patch = _clam_level0_patch(dict(f["coords"].attrs), path)
            grid_rc = np.asarray(f["grid_rc"][()], np.int64) if "grid_rc" in f else None
    except OSError as exc:
        raise AnalysisError(f"cannot read feature file {path}: {exc}") from exc
    if not lazy and feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if grid_rc is None:
        grid_rc = grid_rc_from_coords(coords, None if l0_patch is None else float(l0_patch))
    return Features(
        features=feats,
        coords=coords,
        grid_rc=grid_rc,
        mag=_opt_float(attrs.get("mag")),
        mpp=_opt_float(attrs.get("mpp")),
        patch_size=None if attrs.get("patch_size") is None else int(attrs["patch_size"]),
        l0_patch_size=None if l0_patch is None else float(l0_patch),
        encoder=str(attrs.get("encoder", "")),
    )


def _clam_level0_patch(attrs: dict, path: Path) -> float | None:
    """Level-0 patch spacing from CLAM's ``coords`` attributes (None when it has none)."""
    if attrs.get("patch_size") is None:
        return None
    size = float(attrs["patch_size"])
    downsample = attrs.get("downsample")
    if downsample is not None:
        factors = np.atleast_1d(np.asarray(downsample, np.float64))
        if len(factors) and factors[0] > 0:
            return size * float(factors[0])
    if int(attrs.get("patch_level", 0)) != 0:
        raise AnalysisError(
            f"{path}: coords were patched at level {int(attrs['patch_level'])} but the file has no "
            "'downsample' attribute to convert them to level 0; copy the attributes of CLAM's "
            "patch file onto 'coords' or re-extract"
        )
    return size


def _opt_float(value) -> float | None:
    return None if value is None else float(value)


def grid_rc_from_coords(coords: np.ndarray, l0_patch_size: float | None = None) -> np.ndarray:
    """(N, 2) level-0 x, y -> (N, 2) row, col relative to the top-left-most cell.

    Without a patch size the spacing is estimated from the coordinates: the smallest gap, then
    refined by least squares so a fractional cell size (256.5 px) does not drift over many cells.
    """
    coords = np.asarray(coords, np.float64)
    if len(coords) == 0:
        return np.zeros((0, 2), np.int64)
    offsets = coords - coords.min(axis=0)  # (N, 2)
    spacing = l0_patch_size or _estimate_spacing(offsets)
    return np.rint(offsets[:, ::-1] / spacing).astype(np.int64)  # (x, y) -> (row, col)


def _estimate_spacing(offsets: np.ndarray) -> float:
    values = np.unique(offsets)
    gaps = np.diff(values)
    gaps = gaps[gaps > 2.0]  # rounding a fractional cell size moves coordinates by <= 1 px
    if len(gaps) == 0:
        return 1.0  # a single cell (or a single row and column): any spacing gives (0, 0)
    spacing = float(gaps.min())
    for _ in range(3):
        cells = np.rint(values / spacing)
        mask = cells > 0
        spacing = float((values[mask] * cells[mask]).sum() / (cells[mask] ** 2).sum())
    return spacing
