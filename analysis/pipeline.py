"""Slide -> prediction: tissue, grid, read + encode, MIL, instance scores, stage timings.

The portal's analysis task calls ``predict_slide`` and stores what it returns; the
``lowmag predict`` command prints it. Reading and encoding overlap
(``analysis.features.extract_features``): a reader thread fills batches while the main thread
encodes the previous one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.bundle import LoadedBundle

ProgressCallback = Callable[[str, float], None]  # (stage, fraction of that stage done)

STAGES = ("open", "tissue", "features", "mil", "clusters")


@dataclass
class SlidePrediction:
    slide: str
    classes: list[str]
    probabilities: dict[str, float]
    predicted_class: str
    confidence: float
    instance_scores: np.ndarray  # (N,) float32 in [0, 1], one per grid cell, grid order
    grid: Any  # analysis.tissue.PatchGrid
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage + "total"
    magnification: float = 5.0
    slide_mpp: float = 0.0
    bundle: dict[str, Any] = field(default_factory=dict)  # name, version, sha256, is_demo
    # (N,) uint8 k-means cluster of each patch embedding: a research layer for the viewer
    clusters: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    # (N, D) patch embeddings, kept only while the cluster map is still to be computed
    features: np.ndarray | None = field(default=None, repr=False)
    # (N,) float32 signed class evidence for ``evidence_class`` in logit units, grid order
    # (analysis.mil.evidence); empty when the model gives none. ``instance_scores`` is attention.
    evidence_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    evidence_class: str = ""
    device: str = "cpu"  # where the models ran (the cluster map runs there too)

    @property
    def n_patches(self) -> int:
        return int(len(self.instance_scores))

    def compute_clusters(self) -> np.ndarray:
        """The cluster map of a prediction made with ``clusters=False``, once the result is out.

        Its time is recorded as ``timings["clusters"]``; the embeddings are released after.
        """
        if self.features is not None:
            start = time.perf_counter()
            self.clusters = cluster_instances(self.features, device=self.device)
            self.timings["clusters"] = round(time.perf_counter() - start, 4)
            self.features = None
        return self.clusters

    def to_dict(self, include_scores: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slide": self.slide,
            "classes": self.classes,
            "probabilities": self.probabilities,
            "predicted_class": self.predicted_class,
            "confidence": self.confidence,
            "n_patches": self.n_patches,
            "magnification": self.magnification,
            "slide_mpp": self.slide_mpp,
            "timings": self.timings,
            "bundle": self.bundle,
            "grid": {
                "n_rows": int(self.grid.n_rows),
                "n_cols": int(self.grid.n_cols),
                "l0_patch_size": float(self.grid.l0_patch_size),
            },
        }
        if include_scores:
            out["grid"]["grid_rc"] = np.asarray(self.grid.grid_rc).tolist()
            out["grid"]["l0_xy"] = np.asarray(self.grid.l0_xy).tolist()
            out["instance_scores"] = [round(float(s), 5) for s in self.instance_scores]
            out["clusters"] = [int(c) for c in self.clusters]
            out["evidence_scores"] = [round(float(s), 4) for s in self.evidence_scores]
        out["evidence_class"] = self.evidence_class
        return out


class _StageClock:
    def __init__(self, progress: ProgressCallback | None):
        self.timings: dict[str, float] = {}
        self.progress = progress
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name, 0.0)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 4)
        if self.progress:
            self.progress(name, 1.0)

    def finish(self) -> dict[str, float]:
        self.timings["total"] = round(time.perf_counter() - self._start, 4)
        return self.timings


def cluster_instances(
    features: np.ndarray,
    k: int = 8,
    seed: int = 0,
    max_dims: int = 32,
    device: str | None = None,
) -> np.ndarray:
    """(N,) uint8 k-means cluster ids of the patch embeddings (PCA-reduced first; deterministic).

    On the CPU (the default) scikit-learn computes them; given an accelerator ``device`` the
    same steps run there in torch (``_kmeans_torch``), a few milliseconds instead of the
    fraction of a second k-means costs on the host.
    """
    n = len(features)
    k = max(1, min(k, n))
    if n <= k:
        return np.arange(n, dtype=np.uint8)
    if device is not None and device.split(":")[0] not in ("cpu", "meta"):
        labels = _kmeans_torch(features, k, seed, max_dims, device)
    else:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        reduced = PCA(
            n_components=min(max_dims, n, features.shape[1]), random_state=seed
        ).fit_transform(np.asarray(features, dtype=np.float32))  # (N, <= max_dims)
        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(reduced)
    # Number clusters by size (0 = largest), so colours do not shuffle between runs.
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels].astype(np.uint8)


def _kmeans_torch(
    features: np.ndarray, k: int, seed: int, max_dims: int, device: str, iterations: int = 50
) -> np.ndarray:
    """PCA (top eigenvectors of the covariance), then Lloyd's k-means with k-means++ seeding,
    in torch on ``device``; (N,) int64 labels back on the CPU."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)  # (N, D)
    x = x - x.mean(dim=0, keepdim=True)
    dims = min(max_dims, x.shape[0], x.shape[1])
    _, vectors = torch.linalg.eigh(x.T @ x)  # (D, D), eigenvalues ascending: no (N, N) memory
    z = x @ vectors[:, -dims:].flip(1)  # (N, dims) principal components
    n = z.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = z[first : first + 1]  # (1, dims)
    for _ in range(1, k):  # k-means++: far points are likelier next centres
        d2 = torch.cdist(z, centres).min(dim=1).values.pow(2)  # (N,)
        probs = (d2 / d2.sum().clamp_min(1e-12)).cpu()
        pick = int(torch.multinomial(probs, 1, generator=generator))
        centres = torch.cat([centres, z[pick : pick + 1]])
    labels = torch.cdist(z, centres).argmin(dim=1)  # (N,)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, labels, z)  # (k, dims)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)  # (k, 1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty: stays
        new_labels = torch.cdist(z, centres).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels.cpu().numpy()


def run_mil(mil: Any, features: np.ndarray, grid_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C,) class probabilities and (N,) raw instance scores from a MIL model in eval mode; the
    results come back to the CPU in one copy (device and memory handling:
    ``analysis.mil.bag.run_bag``)."""
    import torch

    from analysis.mil.bag import run_bag

    def forward(feats, coords):
        logits, scores = mil(feats, coords)  # (C,) or (1, C); (N,) or (1, N)
        probabilities = torch.softmax(logits.float().reshape(-1), dim=0)  # (C,)
        return len(probabilities), torch.cat([probabilities, scores.float().reshape(-1)]).cpu()

    n_classes, both = run_bag(mil, features, grid_rc, forward)
    values = both.numpy()
    return values[:n_classes], values[n_classes:]


def run_mil_evidence(
    mil: Any, features: np.ndarray, grid_rc: np.ndarray, classes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Probabilities, attention, signed class evidence and its class index.

    One forward pass (two when the evidence is for another class than the call: see
    ``analysis.mil.evidence.evidence_target``), on the model's device, results copied back to
    the CPU once. Models without ``instance_evidence`` give empty evidence and the call.
    """
    import torch

    from analysis.mil.bag import run_bag
    from analysis.mil.evidence import evidence_target

    if not hasattr(mil, "instance_evidence"):
        probabilities, attention = run_mil(mil, features, grid_rc)
        return probabilities, attention, np.zeros(0, np.float32), int(np.argmax(probabilities))
    n = int(np.shape(features)[0])

    def forward(feats, coords):
        logits, attention, evidence = mil.instance_evidence(feats, coords)
        probs = torch.softmax(logits.float().reshape(-1), dim=0)  # (C,)
        target = evidence_target(classes, probs.cpu().numpy())
        if target != int(probs.argmax()):
            _, _, evidence = mil.instance_evidence(feats, coords, target)
        parts = [probs, attention.float().reshape(-1), evidence.float().reshape(-1)]
        return len(probs), target, torch.cat(parts).cpu()  # one copy back

    n_classes, target, both = run_bag(mil, features, grid_rc, forward)
    values = both.numpy()
    return values[:n_classes], values[n_classes : n_classes + n], values[n_classes + n :], target


def reading_defaults(device: str) -> tuple[int, int]:
    """(encoder batch, reader threads): small batches and 2 readers share a CPU with the
    encoder; an accelerator wants large batches and as many readers as the host can spare."""
    if device.split(":")[0] == "cpu":
        return 64, 2
    return 512, max(2, min(8, (os.cpu_count() or 2) - 1))


def predict_slide(
    bundle: LoadedBundle,
    slide_path: str | Path,
    *,
    mpp: float | None = None,
    min_tissue: float = 0.25,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    clusters: bool = True,
) -> SlidePrediction:
    """Analyse one slide with a loaded bundle. Raises ``AnalysisError`` subclasses on bad input.

    ``batch_size`` and ``workers`` (patch reader threads) default to what suits the encoder's
    device (``reading_defaults``). The slide is opened once. With ``clusters=False`` the k-means cluster map is left out of
    the path to the result: the prediction keeps its embeddings and the caller runs
    ``compute_clusters()`` after it has stored or sent the prediction.
    """
    from analysis.features import extract_features
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    manifest = bundle.manifest
    magnification = float(manifest.magnification)
    default_batch, default_workers = reading_defaults(str(bundle.encoder.device))
    batch_size = batch_size or default_batch
    workers = workers or default_workers
    clock = _StageClock(progress)
    with clock.stage("open"):
        slide = open_slide(slide_path, mpp=mpp)
    with slide:
        with clock.stage("tissue"):
            grid = patch_grid(slide, patch_um=manifest.patch_um, min_tissue=min_tissue)
            # Refuse early (before any encoding) when the slide is coarser than the model's input.
            slide.level_for_magnification(magnification)
        n_cells = len(grid.l0_xy)

        def on_batch(done: int) -> None:
            if progress:
                progress("features", done / n_cells)

        with clock.stage("features"):
            features = extract_features(
                slide,
                grid,
                bundle.encoder,
                magnification,
                batch_size=batch_size,
                workers=workers,
                on_batch=on_batch,
            ).features  # (N, D)
        slide_mpp = float(slide.mpp)
    return _finish(bundle, str(slide_path), grid, features, slide_mpp, clock, clusters)


def _finish(
    bundle: LoadedBundle,
    slide: str,
    grid: Any,
    features: np.ndarray,
    slide_mpp: float,
    clock: _StageClock,
    clusters: bool,
) -> SlidePrediction:
    """MIL, the cluster map and the prediction record of one slide's embeddings."""
    from analysis.heatmap import normalise_scores

    manifest = bundle.manifest
    with clock.stage("mil"):
        probabilities, raw_scores, evidence, target = run_mil_evidence(
            bundle.mil, features, grid.grid_rc, list(manifest.classes)
        )
    cluster_map = np.zeros(0, np.uint8)
    if clusters:
        with clock.stage("clusters"):
            cluster_map = cluster_instances(features, device=str(bundle.encoder.device))
    best = int(np.argmax(probabilities))
    classes = list(manifest.classes)
    return SlidePrediction(
        slide=slide,
        classes=classes,
        probabilities={c: round(float(p), 6) for c, p in zip(classes, probabilities, strict=True)},
        predicted_class=classes[best],
        confidence=float(probabilities[best]),
        instance_scores=normalise_scores(raw_scores),
        grid=grid,
        clusters=cluster_map,
        features=None if clusters else features,
        evidence_scores=evidence,
        evidence_class=classes[target] if len(evidence) else "",
        device=str(bundle.encoder.device),
        timings=clock.finish(),
        magnification=float(manifest.magnification),
        slide_mpp=slide_mpp,
        bundle={
            "name": manifest.name,
            "version": manifest.version,
            "sha256": bundle.sha256,
            "is_demo": manifest.is_demo,
        },
    )


def predict_slides(
    bundle: LoadedBundle,
    slide_paths: Sequence[str | Path],
    *,
    mpp: float | None = None,
    min_tissue: float = 0.25,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    clusters: bool = True,
) -> list[SlidePrediction]:
    """Analyse several slides together: one prediction per slide, in order, as ``predict_slide``.

    The slides' patches are read one slide after the other but encoded in shared batches, so
    an accelerator stays busy across the small bags of 5x slides (the tail batch of one slide
    is filled with the next slide's patches). Each patch's embedding does not depend on its
    batch-mates, so every prediction matches ``predict_slide`` on that slide alone. Bad input
    in any slide raises its ``AnalysisError`` before anything is encoded. ``progress`` hears
    the batch: open, tissue and mil once per slide, features as the share of all the slides'
    patches encoded.
    """
    from contextlib import ExitStack

    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    manifest = bundle.manifest
    magnification = float(manifest.magnification)
    default_batch, default_workers = reading_defaults(str(bundle.encoder.device))
    batch_size = batch_size or default_batch
    workers = workers or default_workers
    clocks = [_StageClock(progress) for _ in slide_paths]
    with ExitStack() as stack:
        slides, grids = [], []
        for path, clock in zip(slide_paths, clocks, strict=True):
            with clock.stage("open"):
                slide = stack.enter_context(open_slide(path, mpp=mpp))
            with clock.stage("tissue"):
                grids.append(patch_grid(slide, patch_um=manifest.patch_um, min_tissue=min_tissue))
                slide.level_for_magnification(magnification)
            slides.append(slide)
        n_cells = sum(len(grid.l0_xy) for grid in grids)

        def on_batch(done: int) -> None:
            if progress:
                progress("features", done / n_cells)

        start = time.perf_counter()
        on_batch(0)
        features = _encode_shared(
            bundle, slides, grids, magnification, batch_size, workers, on_batch
        )
        shared = round(time.perf_counter() - start, 4)
        slide_mpps = [float(slide.mpp) for slide in slides]
    out = []
    for path, grid, feats, slide_mpp, clock in zip(
        slide_paths, grids, features, slide_mpps, clocks, strict=True
    ):
        clock.timings["features"] = shared  # the shared encoding of all the slides
        out.append(_finish(bundle, str(path), grid, feats, slide_mpp, clock, clusters))
    return out


def _encode_shared(
    bundle: LoadedBundle,
    slides: list[Any],
    grids: list[Any],
    magnification: float,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None],
) -> list[np.ndarray]:
    """(N_i, D) embeddings of every slide's grid, encoded in batches that span slides;
    ``on_batch`` hears how many patches are encoded so far."""
    import contextlib

    from analysis.features import _prefetch

    encoder = bundle.encoder
    features = [np.zeros((len(grid.l0_xy), encoder.dim), np.float32) for grid in grids]

    def patches() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for k, (slide, grid) in enumerate(zip(slides, grids, strict=True)):
            for indices, batch in slide.iter_patch_batches(
                grid.l0_xy, magnification, batch_size, patch_um=grid.patch_um, workers=workers
            ):
                yield k, indices, batch

    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    held = done = 0

    def encode() -> None:
        embedded = encoder.embed(np.concatenate([batch for _, _, batch in pending]))  # (B, D)
        nonlocal done
        offset = 0
        for k, indices, _ in pending:
            features[k][indices] = embedded[offset : offset + len(indices)]
            offset += len(indices)
        pending.clear()
        done += offset
        on_batch(done)

    with contextlib.closing(_prefetch(patches(), depth=2)) as prefetched:
        for k, indices, batch in prefetched:
            while len(indices):
                take = min(batch_size - held, len(indices))
                pending.append((k, indices[:take], batch[:take]))
                held += take
                indices, batch = indices[take:], batch[take:]
                if held == batch_size:
                    encode()
                    held = 0
        if pending:
            encode()
    return features
