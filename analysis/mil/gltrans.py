"""GLTrans: the global-local transformer for multiple-instance learning (SPEC §4).

A bag is one slide: N patch embeddings (N, D) and their cells on the slide's patch grid
(N, 2) as (row, col). Each block adds, in parallel, multi-head self-attention over all
instances (global) and depth-wise dilated convolutions over the true 2-D grid (local):

    x = x + Global(LN(x)) + Local(LN(x))
    x = x + FFN(LN(x))

Positions enter only through the local branch, so logits do not depend on the order the
instances are given in, and instance scores follow the instances.

Global attention runs through ``scaled_dot_product_attention`` restricted to the flash /
memory-efficient kernels (memory linear in N; no N x N matrix). Attention dropout is never
used because the CPU flash kernel falls back to the N x N math path when it is on; dropout
acts on the sublayer outputs instead. Where no linear-memory kernel applies, queries are
processed in chunks so peak memory stays linear in N. In low-memory mode
(``analysis.mil.bag.low_memory``) the per-token layers run in row chunks and the local
convolutions in channel chunks too, with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.mil.bag import (
    GlobalAttention,
    as_bag,
    bag_output,
    by_rows,
    channel_chunks,
    depthwise_sum,
)
from analysis.mil.evidence import contrast

MAX_GRID_CELLS = 4_000_000  # 2000 x 2000 cells of 128 µm is 25 cm square: larger is not a slide


@dataclass
class GLTransConfig:
    in_dim: int = 1024  # patch embedding size (ResNet50-trunc: 1024)
    dim: int = 512  # token width after the input projection
    n_classes: int = 2
    n_heads: int = 8  # global attention heads; dim must divide evenly
    depth: int = 2  # number of global-local blocks
    dilations: tuple[int, ...] = (1, 3, 5)  # local branch: one depth-wise 3x3 conv per rate
    kernel_size: int = 3
    ffn_mult: int = 4  # feed-forward hidden width = ffn_mult * dim
    dropout: float = 0.0  # on sublayer outputs (never inside attention: see module docstring)
    score_method: str = "attention"  # instance scores: "attention" or "contrast"

    def __post_init__(self) -> None:
        self.dilations = tuple(int(d) for d in self.dilations)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.score_method not in ("attention", "contrast"):
            raise ValueError(
                f"score_method must be 'attention' or 'contrast', not {self.score_method!r}"
            )


# --- local branch on the true grid -------------------------------------------------------


class GridCells(NamedTuple):
    """Where each instance sits on a dense (H, W) canvas of its bag's grid."""

    flat: Tensor  # (N,) long, row * W + col after shifting min row/col to 0
    n_rows: int
    n_cols: int
    inv_count: Tensor  # (N, 1) 1 / instances sharing the cell (duplicates are averaged)


def grid_cells(grid_rc: Tensor) -> GridCells:
    """Normalise (row, col) so the smallest row and column are 0, and index the canvas."""
    rc = grid_rc.long()
    rc = rc - rc.min(dim=0).values  # (N, 2)
    n_rows, n_cols = (int(v) + 1 for v in rc.max(dim=0).values)
    if n_rows * n_cols > MAX_GRID_CELLS:
        raise ValueError(
            f"the bag's grid spans {n_rows} x {n_cols} cells; coords must be patch-grid "
            "(row, col) cells, not level-0 pixels: divide pixel coordinates by the patch size"
        )
    flat = rc[:, 0] * n_cols + rc[:, 1]  # (N,)
    counts = torch.bincount(flat, minlength=n_rows * n_cols)
    inv_count = (1.0 / counts[flat].float()).unsqueeze(1)  # (N, 1)
    return GridCells(flat, n_rows, n_cols, inv_count)


class LocalConv(nn.Module):
    """Depth-wise dilated 3x3 convolutions on the patch grid, summed over dilation rates.

    Instances are scattered to their cells, empty cells stay zero, and the summed output
    is gathered back at the instance cells. Channels are independent (depth-wise), so in
    low-memory mode a few channels' canvas is built and convolved at a time.
    """

    def __init__(self, dim: int, dilations: tuple[int, ...], kernel_size: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(
                dim,
                dim,
                kernel_size,
                padding=d * (kernel_size // 2),
                dilation=d,
                groups=dim,
            )
            for d in dilations
        )

    def forward(self, x: Tensor, cells: GridCells) -> Tensor:
        plane = cells.n_rows * cells.n_cols
        x = x * cells.inv_count.to(x.dtype)  # (N, D)
        parts = [self._channels(x, cells, c) for c in channel_chunks(x.shape[1], plane)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (N, D)

    def _channels(self, x: Tensor, cells: GridCells, channels: slice) -> Tensor:
        """The convolutions' output at the instance cells for ``channels`` only: (N, c)."""
        plane = cells.n_rows * cells.n_cols
        width = channels.stop - channels.start
        canvas = x.new_zeros(plane, width).index_add(0, cells.flat, x[:, channels])  # (H*W, c)
        # (H, W, c) viewed as (1, c, H, W) is channels-last memory: no copy for the convs.
        canvas = canvas.view(1, cells.n_rows, cells.n_cols, width).permute(0, 3, 1, 2)
        summed = depthwise_sum(self.convs, canvas, channels)  # (1, c, H, W)
        return summed.permute(0, 2, 3, 1).reshape(plane, width)[cells.flat]  # (N, c)


def _require_grid(grid_rc: Tensor | None) -> Tensor:
    if grid_rc is None:
        raise ValueError("GLTrans needs coords: the (N, 2) grid (row, col) of every instance")
    return grid_rc


# --- the model ----------------------------------------------------------------------------


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, mult * dim),
            nn.GELU(),
            nn.Linear(mult * dim, dim),
            nn.Dropout(dropout),
        )


class GlobalLocalBlock(nn.Module):
    def __init__(self, config: GLTransConfig) -> None:
        super().__init__()
        self.ffn_width = config.ffn_mult * config.dim
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = GlobalAttention(config.dim, config.n_heads, config.dropout)
        self.local = LocalConv(config.dim, config.dilations, config.kernel_size)
        self.local_drop = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.dim)
        self.ffn = FeedForward(config.dim, config.ffn_mult, config.dropout)

    def forward(
        self, x: Tensor, cells: GridCells, cls_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        h = self.norm1(x)  # (1 + N, D)
        global_out, weights = self.attn(h, cls_weights)
        local_out = self.local_drop(self.local(h[1:], cells))  # (N, D); CLS gets no local term
        x = x + global_out + F.pad(local_out, (0, 0, 1, 0))
        x = x + by_rows(self.feed_forward, x, self.ffn_width)
        return x, weights

    def feed_forward(self, x: Tensor) -> Tensor:
        """The feed-forward sublayer on its own: (M, D) -> (M, D), each token alone."""
        return self.ffn(self.norm2(x))


class GLTrans(nn.Module):
    """``forward(features, coords) -> (logits, instance_scores)``; one bag per call."""

    def __init__(self, config: GLTransConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, config.dim) * 0.02)
        self.blocks = nn.ModuleList(GlobalLocalBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.n_classes)

    def encode(self, features: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens after the last block (1 + N, D) and last-layer CLS attention (H, 1 + N)."""
        param = self.head.weight
        cells = grid_cells(coords.to(param.device))
        x = self._embed(features)  # (N, D)
        x = torch.cat([self.cls_token, x], dim=0)  # (1 + N, D)
        weights: Tensor | None = None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, cells, cls_weights=i == len(self.blocks) - 1)
        assert weights is not None
        return x, weights[:, 0]

    def _embed(self, features: Tensor) -> Tensor:
        param = self.head.weight
        features = features.to(device=param.device, dtype=param.dtype)
        return by_rows(self.embed, features, self.config.dim)  # (N, D)

    def forward(self, features: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        features, grid_rc, batched = as_bag(features, coords)
        tokens, cls_attention = self.encode(features, _require_grid(grid_rc))
        logits = self.head(self.norm(tokens[0]))  # (C,)
        attention = cls_attention[:, 1:].mean(dim=0)  # (N,) mean over heads
        if self.config.score_method == "contrast":
            scores = self._contrast(tokens[1:], attention, int(logits.argmax()))
        else:
            scores = attention
        return bag_output(logits, batched), scores

    def class_contrast_scores(
        self, features: Tensor, coords: Tensor, target: int | None = None
    ) -> Tensor:
        """Attention x (instance logit of ``target`` minus the mean of the other classes).

        Instance logits come from the readout head applied to each instance's final token.
        ``target`` defaults to the predicted class. Positive: the instance argues for it.
        """
        features, grid_rc, _ = as_bag(features, coords)
        tokens, cls_attention = self.encode(features, _require_grid(grid_rc))
        if target is None:
            target = int(self.head(self.norm(tokens[0])).argmax())
        return self._contrast(tokens[1:], cls_attention[:, 1:].mean(dim=0), target)

    def instance_evidence(
        self, features: Tensor, coords: Tensor | None, target: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(C,) logits, (N,) attention and (N,) class evidence for ``target`` (default: predicted).

        The CLS token reads the slide in the last block's global attention. An instance's own
        logits are what the CLS readout would give if every head read that instance alone
        (its projected values in place of the attention-weighted mix; the rest of the block
        and the head act on the CLS token only). As for the attention-pooling models, which
        this matches exactly, the evidence is N x attention x (target logit minus the mean of
        the others). Instance tokens' own readouts are not used: global attention makes every
        token carry the whole slide.
        """
        features, grid_rc, _ = as_bag(features, coords)
        param = self.head.weight
        cells = grid_cells(_require_grid(grid_rc).to(param.device))
        x = self._embed(features)  # (N, D)
        x = torch.cat([self.cls_token, x], dim=0)  # (1 + N, D)
        for block in self.blocks[:-1]:
            x, _ = block(x, cells, cls_weights=False)
        last = cast(GlobalLocalBlock, self.blocks[-1])
        attn = last.attn
        length, dim = x.shape
        head_dim = dim // attn.n_heads
        qkv = by_rows(attn.qkv, last.norm1(x), 3 * dim).view(length, 3, attn.n_heads, head_dim)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each (H, L, hd)
        weights = (q[:, :1] @ k.transpose(-1, -2) * head_dim**-0.5).softmax(dim=-1)[:, 0]
        read = (weights[:, :, None] * v).sum(dim=1).reshape(dim)  # (D,) the CLS row's read
        alone = v.permute(1, 0, 2).reshape(length, dim)  # (L, D): each token read alone

        def cls_readout(values: Tensor) -> Tensor:  # (M, D) values in the CLS row -> (M, C)
            cls_updates = x[0] + attn.proj(values)  # (M, D)
            return self.head(self.norm(cls_updates + last.feed_forward(cls_updates)))

        values = torch.cat([read[None], alone[1:]], dim=0)  # (1 + N, D)
        all_logits = by_rows(cls_readout, values, last.ffn_width)  # (1 + N, C); row 0: the bag
        logits = all_logits[0]
        attention = weights[:, 1:].mean(dim=0)  # (N,)
        target = int(logits.argmax()) if target is None else target
        return logits, attention, contrast(all_logits[1:], attention, target)

    def _contrast(self, instance_tokens: Tensor, attention: Tensor, target: int) -> Tensor:
        instance_logits = by_rows(self._readout, instance_tokens, self.config.dim)  # (N, C)
        n_classes = instance_logits.shape[1]
        others = (instance_logits.sum(dim=1) - instance_logits[:, target]) / max(1, n_classes - 1)
        return attention * (instance_logits[:, target] - others)  # (N,)

    def _readout(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(tokens))  # (M, D) -> (M, C)
