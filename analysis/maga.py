"""MAGA: align a low-magnification student encoder to a frozen 20x teacher (SPEC §3).

Pairs are the same grid cell read at 20x (teacher, 256 px) and at 5x/10x (student, 64/128 px)
through ``analysis.slides``, the reader used at inference. They are cached once as uint8 ``.npy``
memmaps; the frozen teacher's block outputs, pooled to the student's map sizes, are cached too
(float16), so an epoch costs only student passes.

Loss: ``sum_i w_i * L1(adaptive_avg_pool(T_i), S_i)`` over layer1, layer2, layer3 and the pooled
vector, weights (1, 5, 10, 200) by default; Adam, lr 1e-4, x0.9 per epoch; only the student learns.

BatchNorm: the teacher is always in eval mode (frozen statistics). The student starts from the
teacher's weights *and* statistics; by default (``student_bn="train"``) its BatchNorm layers run in
train mode during alignment, so their running statistics move to low-magnification inputs, and
the saved student is used in eval mode. ``student_bn="frozen"`` keeps the teacher's statistics
(useful for very small batches).

Without teacher weights the fallback teacher is the seeded ResNet50-trunc with its BatchNorm
statistics calibrated on the cache's unlabeled 20x patches; it is saved as ``teacher.safetensors``
beside the student so the unaligned baseline can be reproduced.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.encoders import (
    BLOCK_NAMES,
    build_model,
    calibrate_batchnorm,
    default_device,
    forward_blocks,
    imagenet_normalize,
    load_weights,
    save_weights,
)
from analysis.errors import AnalysisError, NoTissueError
from analysis.files import json_ready as _jsonable
from analysis.files import write_json_atomic
from analysis.slides import PATCH_UM, open_slide, patch_size_px
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


def _select_cells(request: dict, log: Log) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per slide with tissue: (slide number, l0_xy (K, 2), grid_rc (K, 2)), seeded sample."""
    rng = np.random.default_rng(request["seed"])
    selections = []
    for slide_no, path in enumerate(request["slides"]):
        with open_slide(path) as slide:
            try:
                grid = patch_grid(slide, request["patch_um"], request["min_tissue"])
            except NoTissueError:
                log(f"skipping {path}: no tissue patches")
                continue
        n = len(grid.l0_xy)
        keep = np.sort(rng.choice(n, min(n, request["max_patches_per_slide"]), replace=False))
        selections.append((slide_no, grid.l0_xy[keep], grid.grid_rc[keep]))
    if not selections:
        raise NoTissueError(
            f"none of the {len(request['slides'])} slide(s) has tissue patches to build MAGA pairs"
        )
    return selections


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
    precision: str = "fp32"  # 'fp32' | 'bf16' (autocast for student and teacher passes)
    device: str = field(default_factory=default_device)
    num_threads: int | None = None  # torch CPU threads; None leaves the process setting

    def __post_init__(self) -> None:
        if self.student_bn not in ("train", "frozen"):
            raise ValueError(f"student_bn must be 'train' or 'frozen', got {self.student_bn!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if len(self.block_weights) != len(BLOCK_NAMES):
            raise ValueError(f"block_weights needs {len(BLOCK_NAMES)} values ({BLOCK_NAMES})")

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
    history: list[dict]  # one entry per epoch: loss, per-block L1, lr, seconds
    alignment: dict[str, float]  # hold-out distances to the 20x teacher: unaligned vs aligned


def train_maga(
    cache: PairCache,
    out_dir: str | Path,
    config: MagaConfig | None = None,
    teacher_weights: str | Path | None = None,
    resume: bool = False,
    log: Log = _quiet,
) -> MagaResult:
    """Align a student to the frozen teacher on ``cache``; checkpoints every epoch."""
    config = config or MagaConfig()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, teacher_source = _load_teacher(cache, out_dir, config, teacher_weights, resume, log)
    train_idx, holdout_idx = _split(len(cache), config)
    if len(train_idx) < 2:
        raise AnalysisError(f"MAGA needs at least 2 training pairs; the cache has {len(cache)}")
    targets = _teacher_targets(teacher, cache, out_dir, config, log)
    student = build_model(config.encoder).to(config.device)
    student.load_state_dict(teacher.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    history: list[dict] = []
    if resume:
        history = _load_checkpoint(out_dir, config, student, optimizer, scheduler, log)
    for epoch in range(len(history), config.epochs):
        record = _train_epoch(student, optimizer, cache, targets, train_idx, epoch, config)
        scheduler.step()
        history.append(record)
        _save_checkpoint(out_dir, config, student, optimizer, scheduler, history, teacher_source)
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} ({record['seconds']:.1f}s)"
        )
    student_path = save_weights(student.eval(), out_dir / STUDENT_FILE)
    alignment = _alignment(teacher, student, cache, targets, holdout_idx, config)
    summary = {
        "encoder": config.encoder,
        "low_mag": cache.low_mag,
        "high_mag": cache.high_mag,
        "teacher": teacher_source,
        "pairs": len(cache),
        "holdout_pairs": int(len(holdout_idx)),
        "config": _jsonable(asdict(config)),
        "history": history,
        "alignment": alignment,
    }
    _write_json(out_dir / "maga.json", summary)
    return MagaResult(student_path, teacher_source, history, alignment)


def _load_teacher(
    cache: PairCache,
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
        n = min(len(cache), config.calibration_patches)
        log(f"no teacher weights: calibrating the seeded teacher's BatchNorm on {n} 20x patches")
        batches = (
            imagenet_normalize(cache.high[i : min(i + config.batch_size, n)]).to(config.device)
            for i in range(0, n, config.batch_size)
        )
        calibrate_batchnorm(teacher, batches)
        save_weights(teacher, saved)
        source = f"fallback teacher {saved} (seeded init, BN calibrated on {n} unlabeled patches)"
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), source


def _split(n: int, config: MagaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, hold-out) indices; no hold-out for tiny caches."""
    n_hold = int(math.floor(n * config.holdout_fraction)) if n >= 20 else 0
    order = np.random.default_rng(config.seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def _autocast(config: MagaConfig) -> torch.autocast:
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def _teacher_targets(
    teacher: nn.Module, cache: PairCache, out_dir: Path, config: MagaConfig, log: Log
) -> dict[str, np.ndarray]:
    """Teacher block outputs at 20x, pooled to the student's map sizes, cached as float16."""
    target_dir = out_dir / "teacher_targets"
    key = _targets_key(teacher, cache, config)
    meta_path = target_dir / "targets.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return {b: np.load(target_dir / f"{b}.npy", mmap_mode="r") for b in BLOCK_NAMES}
    target_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    shapes = _student_shapes(teacher, cache.low.shape[1], config.device)
    targets = {
        b: np.lib.format.open_memmap(
            target_dir / f"{b}.npy", "w+", np.float16, (len(cache), *shapes[b])
        )
        for b in BLOCK_NAMES
    }
    log(f"computing teacher targets for {len(cache)} pairs")
    with torch.inference_mode(), _autocast(config):
        for i in range(0, len(cache), config.batch_size):
            rows = slice(i, i + config.batch_size)
            x = imagenet_normalize(cache.high[rows]).to(config.device)  # (B, 3, Sh, Sh)
            blocks = forward_blocks(teacher, x)
            for b in BLOCK_NAMES:
                t = blocks[b].float()
                if t.ndim == 4:
                    t = F.adaptive_avg_pool2d(t, (shapes[b][-2], shapes[b][-1]))  # (B, C, h, w)
                targets[b][rows] = t.cpu().numpy().astype(np.float16)
    for arr in targets.values():
        arr.flush()
    _write_json(meta_path, {"key": key})
    return {b: np.load(target_dir / f"{b}.npy", mmap_mode="r") for b in BLOCK_NAMES}


def _student_shapes(model: nn.Module, size: int, device: str) -> dict[str, tuple[int, ...]]:
    """Per-sample block shapes the network gives for a (size x size) input."""
    with torch.inference_mode():
        blocks = forward_blocks(model, torch.zeros(1, 3, size, size, device=device))
    return {b: tuple(blocks[b].shape[1:]) for b in BLOCK_NAMES}


def _targets_key(teacher: nn.Module, cache: PairCache, config: MagaConfig) -> str:
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([str(cache.root.resolve()), len(cache), cache.low.shape[1]]).encode())
    digest.update(config.precision.encode())
    return digest.hexdigest()


def _train_epoch(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    cache: PairCache,
    targets: dict[str, np.ndarray],
    train_idx: np.ndarray,
    epoch: int,
    config: MagaConfig,
) -> dict:
    student.train(config.student_bn == "train")
    order = np.random.default_rng([config.seed, epoch]).permutation(train_idx)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    batches = [b for b in batches if len(b) >= 2]  # BatchNorm in train mode needs 2+ samples
    if config.max_steps_per_epoch:
        batches = batches[: config.max_steps_per_epoch]
    started = time.perf_counter()
    sums = dict.fromkeys(("loss", *BLOCK_NAMES), 0.0)
    lr = optimizer.param_groups[0]["lr"]
    for rows in batches:
        rows = np.sort(rows)  # memmap locality
        x = imagenet_normalize(cache.low[rows]).to(config.device)  # (B, 3, Sl, Sl)
        teacher = {b: torch.from_numpy(targets[b][rows]).to(config.device) for b in BLOCK_NAMES}
        with _autocast(config):
            out = forward_blocks(student, x)
        loss, parts = maga_loss(teacher, out, config.block_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] += float(loss.detach())
        for b, v in parts.items():
            sums[b] += v
    student.eval()
    steps = max(len(batches), 1)
    return {
        "epoch": epoch + 1,
        **{k: v / steps for k, v in sums.items()},
        "steps": len(batches),
        "lr": lr,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _alignment(
    teacher: nn.Module,
    student: nn.Module,
    cache: PairCache,
    targets: dict[str, np.ndarray],
    rows: np.ndarray,
    config: MagaConfig,
) -> dict[str, float]:
    """Hold-out distance to the teacher's 20x embedding: teacher on low-mag vs aligned student."""
    if len(rows) == 0:
        return {}
    reference = np.asarray(targets["pooled"][rows], np.float32)  # (N, D) teacher at 20x
    low = cache.low[rows]
    return {
        "pairs": int(len(rows)),
        "unaligned": embedding_distance(embed_patches(teacher, low, config), reference),
        "aligned": embedding_distance(embed_patches(student, low, config), reference),
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
