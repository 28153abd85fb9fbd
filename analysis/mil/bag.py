"""What every MIL model shares: one bag in, logits out, linear-memory global attention, the
low-memory mode, and ``run_bag``: the one place that retries a bag in it after the device ran
out of memory.

GLTrans and the baselines (ABMIL, CLAM-SB, TransMIL) import these; none imports another model.
In low-memory mode (``low_memory()``) every step of a model whose memory grows with the bag runs
in pieces of at most ``LOW_MEMORY_CHUNK_ELEMENTS`` values: per-instance layers in row chunks
(``by_rows``), depth-wise convolutions in channel chunks (``channel_chunks``), attention in query
chunks, attention pooling with a running max and sum. Each piece is computed exactly as the whole
would be, so the result equals the one-piece result within float rounding. What stays is linear
in the bag: a few (N, D) tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis.errors import AnalysisError

SMALL_BAG = 2048  # below this many tokens an N x N matrix is harmless: any SDPA kernel will do
CHUNK_ELEMENTS = 1 << 25  # fallback: query chunk sized so one chunk's scores hold ~32M floats
LOW_MEMORY_CHUNK_ELEMENTS = 1 << 22  # low-memory mode: ~4M values (16 MB fp32) per chunk
_LOW_MEMORY: ContextVar[bool] = ContextVar("low_memory", default=False)
T = TypeVar("T")
LINEAR_MEMORY_KERNELS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
]


# --- bag handling shared by every MIL model -------------------------------------------------


def as_bag(features: Tensor, coords: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
    """Accept (N, D) or (1, N, D) features; return (N, D), (N, 2) coords, had_batch_dim."""
    batched = features.dim() == 3
    if batched:
        if features.shape[0] != 1:
            raise ValueError(f"MIL models take one bag at a time, got batch {features.shape[0]}")
        features = features[0]
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D) or (1, N, D), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("a bag needs at least one instance")
    if coords is not None:
        if coords.dim() == 3:
            coords = coords[0]
        if coords.shape != (features.shape[0], 2):
            raise ValueError(
                f"coords must be (N, 2) grid (row, col) for {features.shape[0]} instances, "
                f"got {tuple(coords.shape)}"
            )
    return features, coords, batched


def bag_output(logits: Tensor, batched: bool) -> Tensor:
    """(C,) logits, or (1, C) when the caller passed a leading batch dimension."""
    return logits.unsqueeze(0) if batched else logits


# --- low-memory mode ----------------------------------------------------------------------


@contextmanager
def low_memory() -> Iterator[None]:
    """Within it, every MIL model computes a bag in chunks (see the module docstring).

    The result is the same; the peak is a few (N, D) tensors plus ``LOW_MEMORY_CHUNK_ELEMENTS``
    values per step, whatever the kernel or bag size: what ``run_bag`` retries with after the
    device ran out of memory.
    """
    token = _LOW_MEMORY.set(True)
    try:
        yield
    finally:
        _LOW_MEMORY.reset(token)


def run_bag(
    mil: nn.Module,
    features: Any,
    grid_rc: Any,
    forward: Callable[[Tensor, Tensor], T],
    bag_name: str = "the slide's bag",
) -> T:
    """``forward(feats, coords)`` with the bag on the model's device, under inference mode.

    The one out-of-memory policy for every MIL model and every caller (prediction, class
    evidence, validation and test folds in training): when the device runs out of memory the
    bag runs once more in low-memory mode (every model computes the same result in chunks); a
    bag too big even then fails with an ``AnalysisError`` naming it (``bag_name``), its size,
    the model and the device. Two tries at most, so a bag that does not fit never loops.
    ``features`` and ``grid_rc`` are (N, D) and (N, 2) array-likes (lazy ones are read once).
    """
    from analysis.devices import is_out_of_memory, module_device, release_cached_memory

    device = module_device(mil)
    n, dim = (int(v) for v in np.shape(features))
    with torch.inference_mode():
        feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
        coords = torch.from_numpy(np.ascontiguousarray(grid_rc, dtype=np.int64)).to(device)
        reason = ""
        for chunked in (False, True):
            try:
                with low_memory() if chunked else nullcontext():
                    return forward(feats, coords)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(exc):
                    raise
                reason = str(exc).splitlines()[0][:160]
            # Out of the except block the failed try's tensors are garbage: the cache can go.
            release_cached_memory(device)
        del feats, coords
        release_cached_memory(device)
    raise AnalysisError(
        f"{type(mil).__name__} on {device} ran out of memory on {bag_name} of {n} patches "
        f"x {dim} features, even chunked ({reason}); run it on a device with more memory "
        "(--device or LOWMAG_DEVICE), or analyse fewer patches (a higher --min-tissue; the "
        "patch grid, and so the bag, is the same size at every magnification)"
    )


def _chunks(length: int, per_item: int) -> list[slice]:
    if not _LOW_MEMORY.get():
        return [slice(0, length)]
    size = max(1, LOW_MEMORY_CHUNK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def row_chunks(n_rows: int, width: int) -> list[slice]:
    """Rows of an (N, width) result to compute at once: all of them, or chunks in low memory."""
    return _chunks(n_rows, width)


def channel_chunks(channels: int, plane: int) -> list[slice]:
    """Channels of a (C, H, W) depth-wise convolution to compute at once (plane = H * W)."""
    return _chunks(channels, plane)


def by_rows(step: Callable[[Tensor], Tensor], x: Tensor, width: int) -> Tensor:
    """``step(x)`` for a step acting on each row alone (Linear, LayerNorm, an MLP), (N, *) ->
    (N, width): in one call, or in row chunks in low-memory mode."""
    parts = [step(x[rows]) for rows in row_chunks(x.shape[0], width)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def depthwise_sum(convs: nn.ModuleList, x: Tensor, channels: slice) -> Tensor:
    """Sum of depth-wise ``convs`` over ``x`` (1, c, H, W), holding channels ``channels`` of
    their input: each channel is convolved alone, so a slice gives that slice of the whole."""
    total: Tensor | None = None
    for conv in cast(Iterable[nn.Conv2d], convs):
        bias = None if conv.bias is None else conv.bias[channels]
        out = F.conv2d(
            x, conv.weight[channels], bias, conv.stride, conv.padding, conv.dilation, x.shape[1]
        )  # (1, c, H, W)
        total = out if total is None else total + out
    assert total is not None
    return total


# --- attention --------------------------------------------------------------------------


def linear_memory_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention (B, H, L, hd) -> (B, H, L, hd) without an L x L matrix for big L."""
    length = q.shape[-2]
    if _LOW_MEMORY.get():
        return chunked_attention(q, k, v, LOW_MEMORY_CHUNK_ELEMENTS)
    if length <= SMALL_BAG:
        return F.scaled_dot_product_attention(q, k, v)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sdpa_kernel(LINEAR_MEMORY_KERNELS):
                return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError:
        return chunked_attention(q, k, v)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, elements: int | None = None) -> Tensor:
    """Math-path attention over query chunks: peak memory chunk x L instead of L x L."""
    batch, heads, length, _ = q.shape
    budget = CHUNK_ELEMENTS if elements is None else elements
    chunk = max(1, budget // (batch * heads * k.shape[-2]))
    parts = [
        F.scaled_dot_product_attention(q[..., start : start + chunk, :], k, v)
        for start in range(0, length, chunk)
    ]
    return torch.cat(parts, dim=-2)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over CLS + instances; optionally the CLS attention row."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cls_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        length, dim = x.shape  # (L, D), token 0 is CLS
        head_dim = dim // self.n_heads
        qkv = by_rows(self.qkv, x, 3 * dim).view(length, 3, self.n_heads, head_dim)
        q, k, v = qkv.permute(1, 2, 0, 3).contiguous().unbind(0)  # each (H, L, hd)
        out = linear_memory_attention(q[None], k[None], v[None])[0]  # (H, L, hd)
        out = out.transpose(0, 1).reshape(length, dim)  # (L, D)
        weights = None
        if cls_weights:
            # The CLS row alone, with an explicit softmax: (H, 1, L), cheap for any L.
            scores = q[:, :1] @ k.transpose(-1, -2) * head_dim**-0.5
            weights = scores.softmax(dim=-1)
        return self.drop(by_rows(self.proj, out, dim)), weights
