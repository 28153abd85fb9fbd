"""MAGA: align a low-magnification student encoder to a frozen 20x teacher (SPEC §3).

Pairs are the same grid cell seen at 20x (teacher, 256 px) and at 5x/10x (student, 64/128 px).
``SlidePairs`` (the default) samples cells from the tissue grids of many slides and reads them
while training, in DataLoader worker processes: one 20x region read per pair, the low-
magnification patch derived from it by box averaging, so nothing is stored on disk. The older
``PairCache`` (both reads cached as uint8 ``.npy`` memmaps, ~200 KB per 5x pair) remains for
small experiments. Either way the frozen teacher's targets are computed batch by batch on the
training device (bf16 where the device has a fast path) and never written to disk.

Loss: ``sum_i w_i * L1(adaptive_avg_pool(T_i), S_i)`` over layer1, layer2, layer3 and the pooled
vector, weights (1, 5, 10, 200) by default; Adam, lr 1e-4, x0.9 per epoch; only the student learns.

BatchNorm: the teacher is always in eval mode (frozen statistics). The student starts from the
teacher's weights *and* statistics; by default (``student_bn="train"``) its BatchNorm layers run in
train mode during alignment, so their running statistics move to low-magnification inputs, and
the saved student is used in eval mode. ``student_bn="frozen"`` keeps the teacher's statistics
(useful for very small batches).

Without teacher weights the fallback teacher is the seeded ResNet50-trunc with its BatchNorm
statistics calibrated on unlabeled 20x patches; it is saved as ``teacher.safetensors`` beside
the student so the unaligned baseline can be reproduced.

Several GPUs: launch the same command under ``torchrun --nproc-per-node N``; each process trains
on its share of every epoch and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.encoders import (
    BLOCK_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    calibrate_batchnorm,
    default_device,
    fast_bf16_available,
    forward_blocks,
    imagenet_normalize,
    load_weights,
    save_weights,
)
from analysis.errors import AnalysisError, MagnificationUnavailableError, NoTissueError
from analysis.files import json_ready as _jsonable
from analysis.files import write_json_atomic
from analysis.slides import PATCH_UM, SlideCache, open_slide, patch_size_px
from analysis.tissue import patch_grid

CACHE_MANIFEST = "pairs.json"
STATE_FILE = "state.json"
STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
READ_CHUNK = 64  # patches read per call while building the pair cache

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Pair cache
# --------------------------------------------------------------------------------------------


@dataclass
class PairCache:
    """Paired patches on disk: ``high[i]`` and ``low[i]`` show the same grid cell."""

    root: Path
    high: np.ndarray  # (N, Sh, Sh, 3) uint8 memmap, e.g. Sh = 256 at 20x
    low: np.ndarray  # (N, Sl, Sl, 3) uint8 memmap, e.g. Sl = 64 at 5x
    slide_index: np.ndarray  # (N,) int64 index into ``slides``
    l0_xy: np.ndarray  # (N, 2) int64 level-0 top-left of each cell
    grid_rc: np.ndarray  # (N, 2) int64
    slides: list[str]
    low_mag: float
    high_mag: float

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        return i, np.array(self.high[i]), np.array(self.low[i])

    @property
    def low_size(self) -> int:
        return int(self.low.shape[1])

    def describe(self) -> dict:
        return {"kind": "pair_cache", "root": str(self.root), "slides": len(self.slides)}

    @classmethod
    def open(cls, root: str | Path) -> PairCache:
        root = Path(root)
        manifest_path = root / CACHE_MANIFEST
        if not manifest_path.is_file():
            raise AnalysisError(f"{root} is not a complete MAGA pair cache (no {CACHE_MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        meta = np.load(root / "pairs_meta.npz")
        return cls(
            root=root,
            high=np.load(root / "high.npy", mmap_mode="r"),
            low=np.load(root / "low.npy", mmap_mode="r"),
            slide_index=meta["slide_index"],
            l0_xy=meta["l0_xy"],
            grid_rc=meta["grid_rc"],
            slides=manifest["slides"],
            low_mag=float(manifest["low_mag"]),
            high_mag=float(manifest["high_mag"]),
        )


def build_pair_cache(
    slide_paths: Sequence[str | Path],
    out_dir: str | Path,
    low_mag: float = 5,
    high_mag: float = 20,
    max_patches_per_slide: int = 512,
    seed: int = 0,
    min_tissue: float = 0.25,
    patch_um: float = PATCH_UM,
    workers: int = 2,
    log: Log = _quiet,
) -> PairCache:
    """Sample up to ``max_patches_per_slide`` tissue cells per slide and cache both reads.

    A cache already in ``out_dir`` built with the same arguments is reused as is.
    """
    out_dir = Path(out_dir)
    request: dict[str, Any] = {
        "slides": [str(Path(p)) for p in slide_paths],
        "files": [_file_identity(p) for p in slide_paths],  # a changed file is re-read
        "low_mag": float(low_mag),
        "high_mag": float(high_mag),
        "max_patches_per_slide": int(max_patches_per_slide),
        "seed": int(seed),
        "min_tissue": float(min_tissue),
        "patch_um": float(patch_um),
    }
    if low_mag >= high_mag:
        raise ValueError(f"low_mag ({low_mag}) must be below high_mag ({high_mag})")
    existing = out_dir / CACHE_MANIFEST
    if existing.is_file() and json.loads(existing.read_text()).get("request") == request:
        log(f"reusing pair cache {out_dir}")
        return PairCache.open(out_dir)
    selections = _select_cells(request, log)
    n = sum(len(xy) for _, xy, _ in selections)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing.unlink(missing_ok=True)
    s_high, s_low = patch_size_px(high_mag, patch_um), patch_size_px(low_mag, patch_um)
    high = np.lib.format.open_memmap(out_dir / "high.npy", "w+", np.uint8, (n, s_high, s_high, 3))
    low = np.lib.format.open_memmap(out_dir / "low.npy", "w+", np.uint8, (n, s_low, s_low, 3))
    start = 0
    for slide_no, l0_xy, _ in selections:
        with open_slide(request["slides"][slide_no]) as slide:
            for i in range(0, len(l0_xy), READ_CHUNK):
                chunk = l0_xy[i : i + READ_CHUNK]
                rows = slice(start + i, start + i + len(chunk))
                high[rows] = slide.read_patches(chunk, high_mag, patch_um, workers=workers)
                low[rows] = slide.read_patches(chunk, low_mag, patch_um, workers=workers)
        start += len(l0_xy)
        log(f"cached {len(l0_xy)} pairs from {request['slides'][slide_no]}")
    high.flush()
    low.flush()
    del high, low
    np.savez(
        out_dir / "pairs_meta.npz",
        slide_index=np.concatenate([np.full(len(xy), k, np.int64) for k, xy, _ in selections]),
        l0_xy=np.concatenate([xy for _, xy, _ in selections]).astype(np.int64),
        grid_rc=np.concatenate([rc for _, _, rc in selections]).astype(np.int64),
    )
    manifest = {**request, "request": request, "count": n, "low_size": s_low, "high_size": s_high}
    _write_json(existing, manifest)  # written last: marks the cache complete
    return PairCache.open(out_dir)


def _file_identity(path: str | Path) -> list:
    """(size, modification time) of a slide file: cheap, and changes whenever the file does."""
    try:
        stat = Path(path).stat()
    except OSError:
        return [None, None]
    return [stat.st_size, stat.st_mtime_ns]


def _select_cells(request: dict, log: Log) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per slide with tissue: (slide number, l0_xy (K, 2), grid_rc (K, 2)), seeded sample."""
    rng = np.random.default_rng(request["seed"])
    selections = []
    too_coarse: list[str] = []
    for slide_no, path in enumerate(request["slides"]):
        with open_slide(path, mpp=request.get("mpp")) as slide:
            try:
                slide.level_for_magnification(request["high_mag"])
                grid = patch_grid(slide, request["patch_um"], request["min_tissue"])
            except NoTissueError:
                log(f"skipping {path}: no tissue patches")
                continue
            except MagnificationUnavailableError:
                log(f"skipping {path}: it is not scanned at {request['high_mag']:g}x or finer")
                too_coarse.append(Path(path).name)
                continue
        n = len(grid.l0_xy)
        keep = np.sort(rng.choice(n, min(n, request["max_patches_per_slide"]), replace=False))
        selections.append((slide_no, grid.l0_xy[keep], grid.grid_rc[keep]))
    if not selections:
        n_slides = len(request["slides"])
        if len(too_coarse) == n_slides:
            raise MagnificationUnavailableError(
                f"MAGA cannot read at {request['high_mag']:g}x: none of the {n_slides} slide(s) "
                f"is scanned that fine (e.g. {too_coarse[0]}); MAGA needs the "
                f"{request['high_mag']:g}x originals, not low-magnification exports"
            )
        raise NoTissueError(
            f"none of the {n_slides} slide(s) has tissue patches to build MAGA pairs"
            + (
                f" ({len(too_coarse)} not scanned at {request['high_mag']:g}x)"
                if too_coarse
                else ""
            )
        )
    return selections


class PairSource(Protocol):
    """What ``train_maga`` reads: item ``i`` is (i, high (Sh, Sh, 3) uint8, low (Sl, Sl, 3) uint8)."""

    low_mag: float
    high_mag: float

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]: ...

    @property
    def low_size(self) -> int: ...

    def describe(self) -> dict: ...


_WORKER_SLIDES: tuple[int, SlideCache] | None = None  # (pid, cache): one cache per process


def _slides_of_this_process() -> SlideCache:
    """Open slides are per process: a DataLoader worker never reuses its parent's handles."""
    global _WORKER_SLIDES
    if _WORKER_SLIDES is None or _WORKER_SLIDES[0] != os.getpid():
        _WORKER_SLIDES = (os.getpid(), SlideCache(capacity=32))
    return _WORKER_SLIDES[1]


class SlidePairs:
    """Pairs sampled from the tissue grids of many slides, read when asked for (a torch Dataset).

    Item ``i`` reads cell ``l0_xy[i]`` once at ``high_mag`` (one region read and decode) and
    derives the ``low_mag`` patch from it by box averaging; the slides stay open per process.
    Only the sampled cell list (16 bytes per pair) is kept in memory; nothing goes to disk.
    """

    def __init__(
        self,
        slide_paths: Sequence[str | Path],
        low_mag: float = 5,
        high_mag: float = 20,
        pairs_per_slide: int = 512,
        seed: int = 0,
        min_tissue: float = 0.25,
        patch_um: float = PATCH_UM,
        log: Log = _quiet,
        mpp: float | None = None,
    ) -> None:
        """``mpp``: level-0 µm/px for slides whose files carry no scale (as ``open_slide``)."""
        self.mpp = mpp
        if low_mag >= high_mag:
            raise ValueError(f"low_mag ({low_mag}) must be below high_mag ({high_mag})")
        self.low_mag, self.high_mag, self.patch_um = float(low_mag), float(high_mag), patch_um
        self.high_size = patch_size_px(high_mag, patch_um)
        self._low_size = patch_size_px(low_mag, patch_um)
        if self.high_size % self._low_size:
            raise ValueError(
                f"{high_mag:g}x patches ({self.high_size} px) do not box-average to "
                f"{low_mag:g}x ({self._low_size} px); use magnifications whose ratio is an integer"
            )
        request: dict[str, Any] = {
            "slides": [str(Path(p)) for p in slide_paths],
            "low_mag": self.low_mag,
            "high_mag": self.high_mag,
            "max_patches_per_slide": int(pairs_per_slide),
            "seed": int(seed),
            "min_tissue": float(min_tissue),
            "patch_um": float(patch_um),
            "mpp": mpp,
        }
        selections = _select_cells(request, log)
        self.slides = [request["slides"][k] for k, _, _ in selections]
        self.slide_index = np.concatenate(
            [np.full(len(xy), i, np.int32) for i, (_, xy, _) in enumerate(selections)]
        )
        self.l0_xy = np.concatenate([xy for _, xy, _ in selections]).astype(np.int64)
        log(f"sampled {len(self)} pairs from {len(self.slides)} slide(s)")

    def __len__(self) -> int:
        return len(self.l0_xy)

    @property
    def low_size(self) -> int:
        return self._low_size

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        slide = _slides_of_this_process().get(self.slides[self.slide_index[i]], self.mpp)
        high = slide.read_patch(tuple(self.l0_xy[i]), self.high_mag, self.patch_um)
        if not high.flags.writeable:  # torch wants writable memory
            high = np.array(high)
        return i, high, box_downsample(high, self.high_size // self._low_size)

    def describe(self) -> dict:
        return {"kind": "slides", "slides": len(self.slides), "disk_bytes_per_pair": 0}


def box_downsample(patch: np.ndarray, factor: int) -> np.ndarray:
    """(S, S, 3) uint8 -> (S / factor, S / factor, 3) uint8, the mean of each factor x factor box."""
    if factor == 1:
        return patch
    s = patch.shape[0] // factor
    boxes = patch[: s * factor, : s * factor].reshape(s, factor, s, factor, 3)
    return (boxes.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Loss and similarity
# --------------------------------------------------------------------------------------------


def maga_loss(
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    weights: Sequence[float],
    blocks: Sequence[str] = BLOCK_NAMES,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_i w_i * L1(pool(T_i), S_i)``; teacher maps are pooled to the student's size."""
    total = torch.zeros((), device=next(iter(student.values())).device)
    parts = {}
    for name, weight in zip(blocks, weights, strict=True):
        s = student[name].float()  # (B, C, h, w) or (B, D)
        t = teacher[name].float()
        if t.ndim == 4 and t.shape[-2:] != s.shape[-2:]:
            t = F.adaptive_avg_pool2d(t, (s.shape[-2], s.shape[-1]))  # (B, C, h, w)
        term = F.l1_loss(s, t)
        parts[name] = float(term.detach())
        total = total + weight * term
    return total, parts


def embedding_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance between L2-normalised rows of a and b (0 = same direction, <= 2)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.linalg.norm(a - b, axis=1)


def embedding_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The paper's similarity score: mean normalised L2 distance over patches (lower = closer)."""
    return float(embedding_distances(a, b).mean())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class MagaConfig:
    encoder: str = "resnet50_trunc"  # registry name; teacher and student share it
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # Adam, as the paper
    lr_decay: float = 0.9  # ExponentialLR gamma, applied once per epoch
    block_weights: tuple[float, ...] = (1.0, 5.0, 10.0, 200.0)  # layer1, layer2, layer3, pooled
    student_bn: str = "train"  # 'train': re-estimate BN stats on low-mag input; 'frozen': keep
    seed: int = 0  # shuffling and the hold-out split
    holdout_fraction: float = 0.1  # pairs kept out of training to measure alignment
    max_steps_per_epoch: int | None = None  # cap for quick runs
    calibration_patches: int = 256  # 20x patches that calibrate the fallback teacher's BN
    precision: str = "fp32"  # "fp32" | "bf16" | "auto" (bf16 where the device has a fast path)
    device: str = field(default_factory=default_device)
    num_threads: int | None = None  # torch CPU threads; None leaves the process setting
    workers: int = 0  # DataLoader worker processes reading pairs (0: read in this process)
    target_memory_mb: float = 512  # keep teacher targets in RAM for the run when they fit
    log_every_s: float = 10.0  # progress line interval

    def __post_init__(self) -> None:
        if self.student_bn not in ("train", "frozen"):
            raise ValueError(f"student_bn must be 'train' or 'frozen', got {self.student_bn!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {self.precision!r}")
        if len(self.block_weights) != len(BLOCK_NAMES):
            raise ValueError(f"block_weights needs {len(BLOCK_NAMES)} values ({BLOCK_NAMES})")

    @property
    def use_bf16(self) -> bool:
        if self.precision == "auto":
            return fast_bf16_available(self.device)
        return self.precision == "bf16"

    def resume_key(self) -> dict:
        """Fields that must match to continue a run (epochs may grow)."""
        keys = ("encoder", "batch_size", "lr", "lr_decay", "block_weights", "student_bn", "seed")
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys
        }


@dataclass
class MagaResult:
    student_path: Path
    teacher_source: str
    history: list[dict]  # one entry per epoch: loss, per-block L1, lr, seconds, pairs/s
    alignment: dict[str, float]  # hold-out distances to the 20x teacher: unaligned vs aligned
    student: nn.Module | None = None  # the aligned network, in eval mode


def train_maga(
    pairs: PairSource,
    out_dir: str | Path,
    config: MagaConfig | None = None,
    teacher_weights: str | Path | None = None,
    resume: bool = False,
    log: Log = _quiet,
) -> MagaResult:
    """Align a student to the frozen teacher on ``pairs``; checkpoints every epoch.

    ``pairs`` is a ``SlidePairs`` (read from the slides while training, nothing on disk) or a
    ``PairCache``. The teacher's targets are computed from the 20x patches batch by batch on
    ``config.device``; they are kept in RAM for the rest of the run only when they fit in
    ``config.target_memory_mb``, never on disk. Under ``torchrun`` with more than one process
    the student is wrapped in DistributedDataParallel and each process trains on its share.
    """
    config = config or MagaConfig()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(out_dir)
    rank, world = _distributed()
    train_idx, holdout_idx = _split(len(pairs), config)
    if len(train_idx) < 2:
        raise AnalysisError(f"MAGA needs at least 2 training pairs; there are {len(pairs)}")
    teacher, teacher_source = _load_teacher(pairs, out_dir, config, teacher_weights, resume, log)
    if rank == 0:  # only now: a teacher file that does not fit leaves nothing behind
        out_dir.mkdir(parents=True, exist_ok=True)
    shapes = _student_shapes(teacher, pairs.low_size, config.device)
    targets = _TargetMemo(teacher, shapes, config, len(pairs))
    student = build_model(config.encoder).to(config.device)
    student.load_state_dict(teacher.state_dict())
    trained: nn.Module = _Blocks(student)
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(trained)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    history: list[dict] = []
    if resume:
        history = _load_checkpoint(out_dir, config, student, optimizer, scheduler, log)
    for epoch in range(len(history), config.epochs):
        record = _train_epoch(trained, optimizer, pairs, targets, train_idx, epoch, config, log)
        scheduler.step()
        history.append(record)
        if rank == 0:
            _save_checkpoint(
                out_dir, config, student, optimizer, scheduler, history, teacher_source
            )
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} "
            f"({record['seconds']:.1f}s, {record['pairs_per_s']:.1f} pairs/s)"
        )
    student_path = out_dir / STUDENT_FILE
    if rank == 0:
        save_weights(student.eval(), student_path)
    if world > 1:
        torch.distributed.barrier()  # every process returns with the files in place
    alignment = _alignment(teacher, student, pairs, targets, holdout_idx, config)
    summary = {
        "encoder": config.encoder,
        "low_mag": pairs.low_mag,
        "high_mag": pairs.high_mag,
        "teacher": teacher_source,
        "pairs": len(pairs),
        "pair_source": pairs.describe(),
        "holdout_pairs": int(len(holdout_idx)),
        "config": _jsonable(asdict(config)),
        "history": history,
        "alignment": alignment,
    }
    if rank == 0:
        _write_json(out_dir / "maga.json", summary)
    _slides_of_this_process().clear()  # slides opened here (workers=0) are closed again
    return MagaResult(student_path, teacher_source, history, alignment, student.eval())


class _Blocks(nn.Module):
    """``forward`` = the encoder's ``forward_blocks`` (what DistributedDataParallel wraps)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return forward_blocks(self.encoder, x)


def _distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed has been initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> str | None:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group; returns this rank's device."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return "cpu"


def _loader(
    pairs: PairSource, indices: np.ndarray, config: MagaConfig, drop_small: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (index (B,), high (B, Sh, Sh, 3) uint8, low (B, Sl, Sl, 3) uint8) in ``indices``'
    order, read by ``config.workers`` processes."""
    from torch.utils.data import DataLoader, Subset

    loader: DataLoader = DataLoader(
        Subset(pairs, [int(i) for i in indices]),  # type: ignore[arg-type]
        batch_size=config.batch_size,
        num_workers=config.workers,
        pin_memory=config.device.startswith("cuda"),
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
    )
    for index, high, low in loader:
        if drop_small and len(index) < 2:  # BatchNorm in train mode needs 2+ samples
            continue
        yield index, high, low


def _to_input(patches: torch.Tensor, device: str) -> torch.Tensor:
    """(B, H, W, 3) uint8 (CPU) -> (B, 3, H, W) ImageNet-normalised float32 on ``device``."""
    x = patches.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class _TargetMemo:
    """The frozen teacher's targets for a batch: computed on the device from the 20x patches.

    When every pair's targets fit in ``target_memory_mb`` they are kept (float16, CPU) for the
    rest of this run, so later epochs skip the teacher pass; nothing is written to disk, so a
    later run can never pick up targets of other patches.
    """

    def __init__(
        self, teacher: nn.Module, shapes: dict[str, tuple[int, ...]], config: MagaConfig, n: int
    ) -> None:
        self.teacher = teacher
        self.shapes = shapes
        self.config = config
        per_pair = sum(2 * math.prod(shape) for shape in shapes.values())  # float16 bytes
        self.keep = per_pair * n <= config.target_memory_mb * 2**20
        self.memo: dict[int, dict[str, torch.Tensor]] = {}
        self.teacher_passes = 0

    def __call__(self, index: torch.Tensor, high: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [int(i) for i in index]
        device = self.config.device
        if self.keep and all(r in self.memo for r in rows):
            return {
                b: torch.stack([self.memo[r][b] for r in rows]).to(device).float()
                for b in BLOCK_NAMES
            }
        out = self.compute(high)
        if self.keep:
            cpu = {b: t.to("cpu", torch.float16) for b, t in out.items()}
            for k, r in enumerate(rows):
                self.memo[r] = {b: cpu[b][k] for b in BLOCK_NAMES}
        return out

    @torch.no_grad()
    def compute(self, high: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, Sh, Sh, 3) uint8 -> teacher block outputs pooled to the student's map sizes."""
        self.teacher_passes += 1
        with _autocast(self.config):
            blocks = forward_blocks(self.teacher, _to_input(high, self.config.device))
        out = {}
        for b in BLOCK_NAMES:
            t = blocks[b].float()
            if t.ndim == 4 and t.shape[-2:] != self.shapes[b][-2:]:
                t = F.adaptive_avg_pool2d(t, (self.shapes[b][-2], self.shapes[b][-1]))
            out[b] = t
        return out


def _load_teacher(
    pairs: PairSource,
    out_dir: Path,
    config: MagaConfig,
    weights: str | Path | None,
    resume: bool,
    log: Log,
) -> tuple[nn.Module, str]:
    teacher = build_model(config.encoder, weights).to(config.device)
    source = str(weights) if weights else ""
    saved = out_dir / TEACHER_FILE
    if weights is None and resume and saved.is_file():
        load_weights(teacher, saved)
        source = f"fallback teacher {saved}"
    elif weights is None:
        n = min(len(pairs), config.calibration_patches)
        log(f"no teacher weights: calibrating the seeded teacher's BatchNorm on {n} 20x patches")
        batches = (
            _to_input(high, config.device)
            for _, high, _ in _loader(pairs, _spread(len(pairs), n), config, drop_small=False)
        )
        calibrate_batchnorm(teacher, batches)
        if _distributed()[0] == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_weights(teacher, saved)
        source = f"fallback teacher {saved} (seeded init, BN calibrated on {n} unlabeled patches)"
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), source


def _split(n: int, config: MagaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, hold-out) indices; no hold-out for tiny sets."""
    n_hold = int(math.floor(n * config.holdout_fraction)) if n >= 20 else 0
    order = np.random.default_rng(config.seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def _autocast(config: MagaConfig) -> torch.autocast:
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.use_bf16)


def _student_shapes(model: nn.Module, size: int, device: str) -> dict[str, tuple[int, ...]]:
    """Per-sample block shapes the network gives for a (size x size) input."""
    with torch.inference_mode():
        blocks = forward_blocks(model, torch.zeros(1, 3, size, size, device=device))
    return {b: tuple(blocks[b].shape[1:]) for b in BLOCK_NAMES}


def _train_epoch(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    pairs: PairSource,
    targets: _TargetMemo,
    train_idx: np.ndarray,
    epoch: int,
    config: MagaConfig,
    log: Log = _quiet,
) -> dict:
    rank, world = _distributed()
    student.train(config.student_bn == "train")
    order = epoch_order(train_idx, config.seed, epoch)
    order = order[rank::world][: len(order) // world]  # equal shares: DDP steps in lockstep
    steps = math.ceil(len(order) / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
        order = order[: steps * config.batch_size]
    started = last_log = time.perf_counter()
    sums = dict.fromkeys(("loss", *BLOCK_NAMES), 0.0)
    lr = optimizer.param_groups[0]["lr"]
    done_steps = done_pairs = 0
    for index, high, low in _loader(pairs, order, config):
        teacher = targets(index, high)
        x = _to_input(low, config.device)  # (B, 3, Sl, Sl)
        with _autocast(config):
            out = student(x)  # block outputs (through DDP's forward when distributed)
        loss, parts = maga_loss(teacher, out, config.block_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] += float(loss.detach())
        for b, v in parts.items():
            sums[b] += v
        done_steps += 1
        done_pairs += len(index)
        now = time.perf_counter()
        if now - last_log >= config.log_every_s:
            rate = done_pairs / (now - started)
            eta = (len(order) - done_pairs) / max(rate, 1e-9)
            log(
                f"epoch {epoch + 1}/{config.epochs} step {done_steps}/{steps}: "
                f"loss {sums['loss'] / done_steps:.4f}, {rate:.1f} pairs/s, "
                f"epoch ETA {_duration(eta)}"
            )
            last_log = now
    student.eval()
    seconds = time.perf_counter() - started
    n = max(done_steps, 1)
    return {
        "epoch": epoch + 1,
        **{k: v / n for k, v in sums.items()},
        "steps": done_steps,
        "pairs": done_pairs,
        "lr": lr,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(done_pairs / max(seconds, 1e-9), 2),
    }


READ_RUN = 8  # pairs read in a row from one slide (and one neighbourhood of its grid)


def epoch_order(train_idx: np.ndarray, seed: int, epoch: int, run: int = READ_RUN) -> np.ndarray:
    """A seeded shuffle of runs of ``run`` consecutive pairs.

    Pairs are stored slide by slide in grid order, so a run is (mostly) neighbouring cells of
    one slide: a reader opens each slide once per run and reuses decoded tiles, while a batch
    still mixes batch_size / run slides.
    """
    runs = [train_idx[i : i + run] for i in range(0, len(train_idx), run)]
    shuffled = np.random.default_rng([seed, epoch]).permutation(len(runs))
    return np.concatenate([runs[k] for k in shuffled]) if runs else train_idx


def _spread(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (calibration sees every part of a cohort)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _alignment(
    teacher: nn.Module,
    student: nn.Module,
    pairs: PairSource,
    targets: _TargetMemo,
    rows: np.ndarray,
    config: MagaConfig,
) -> dict[str, float]:
    """Hold-out distance to the teacher's 20x embedding: teacher on low-mag vs aligned student."""
    if len(rows) == 0:
        return {}
    reference, unaligned, aligned = [], [], []
    teacher.eval()
    student.eval()
    with torch.no_grad():
        for index, high, low in _loader(pairs, rows, config, drop_small=False):
            reference.append(targets(index, high)["pooled"].float().cpu())  # teacher at 20x
            x = _to_input(low, config.device)
            with _autocast(config):
                unaligned.append(teacher(x).float().cpu())
                aligned.append(student(x).float().cpu())
    ref = torch.cat(reference).numpy()
    return {
        "pairs": int(len(rows)),
        "unaligned": embedding_distance(torch.cat(unaligned).numpy(), ref),
        "aligned": embedding_distance(torch.cat(aligned).numpy(), ref),
    }


def embed_patches(model: nn.Module, patches_uint8: np.ndarray, config: MagaConfig) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float32 with ``model`` in eval mode."""
    model.eval()
    out = []
    with torch.inference_mode(), _autocast(config):
        for i in range(0, len(patches_uint8), config.batch_size):
            x = imagenet_normalize(patches_uint8[i : i + config.batch_size]).to(config.device)
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _save_checkpoint(
    out_dir: Path,
    config: MagaConfig,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: list[dict],
    teacher_source: str,
) -> None:
    """Epoch-numbered weight + optimizer files, then ``state.json`` pointing at them."""
    ckpt = out_dir / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    epoch = len(history)
    save_weights(student, ckpt / f"epoch{epoch:03d}.safetensors")
    tmp = ckpt / f"epoch{epoch:03d}.optim.pt.tmp"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    tmp.replace(ckpt / f"epoch{epoch:03d}.optim.pt")
    state = {
        "epoch": epoch,
        "weights": f"epoch{epoch:03d}.safetensors",
        "optimizer": f"epoch{epoch:03d}.optim.pt",
        "config": config.resume_key(),
        "teacher": teacher_source,
        "history": history,
    }
    _write_json(ckpt / STATE_FILE, state)
    for old in ckpt.glob("epoch*"):
        if not old.name.startswith(f"epoch{epoch:03d}."):
            old.unlink()


def _load_checkpoint(
    out_dir: Path,
    config: MagaConfig,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    log: Log,
) -> list[dict]:
    """Restore the last checkpoint; returns its history (empty when there is none)."""
    ckpt = out_dir / "checkpoints"
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        log(f"no checkpoint in {ckpt}: starting from epoch 1")
        return []
    state = json.loads(state_path.read_text())
    if state["config"] != config.resume_key():
        raise AnalysisError(
            f"checkpoint in {ckpt} was trained with {state['config']}, not {config.resume_key()}; "
            "use the same settings or a new output folder"
        )
    load_weights(student, ckpt / state["weights"])
    saved = torch.load(ckpt / state["optimizer"], map_location=config.device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    log(f"resuming after epoch {state['epoch']}")
    return list(state["history"])


def _write_json(path: Path, payload: dict) -> None:
    write_json_atomic(path, _jsonable(payload))
