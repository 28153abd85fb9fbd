"""TransMIL (Shao et al., 2021), re-implemented from the paper's description.

Instances are projected, the sequence is squared (padded to the next square length S*S by
repeating instances cyclically from the start), a CLS token is prepended, and two transformer
layers run with a PPEG (pyramid position encoding generator: depth-wise 7x7, 5x5 and 3x3 convs
plus identity on the S x S reshaped tokens) between them. Readout: CLS -> LayerNorm -> Linear.

Differences from the paper, on purpose: attention is exact softmax attention through the
same linear-memory ``scaled_dot_product_attention`` path GLTrans uses, instead of the Nyström
approximation. Positions come from the sequence order (as in the paper), so unlike GLTrans the
output depends on the order instances are given in; ``coords`` is accepted and ignored.
Instance scores: last-layer CLS attention averaged over heads, with each padded copy's
attention added to its original instance. Attention is exact, and the PPEG convolutions are
depth-wise, so low-memory mode (``analysis.mil.bag.low_memory``) computes the same result in
query, row and channel chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from analysis.mil.bag import (
    GlobalAttention,
    as_bag,
    bag_output,
    by_rows,
    channel_chunks,
    depthwise_sum,
)


@dataclass
class TransMILConfig:
    in_dim: int = 1024  # patch embedding size
    dim: int = 512  # token width
    n_classes: int = 2
    n_heads: int = 8
    dropout: float = 0.0  # on attention outputs (never inside attention)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


class TransLayer(nn.Module):
    def __init__(self, config: TransMILConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.attn = GlobalAttention(config.dim, config.n_heads, config.dropout)

    def forward(self, x: Tensor, cls_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        out, weights = self.attn(self.norm(x), cls_weights)
        return x + out, weights


class PPEG(nn.Module):
    """Convolutional position encoding on the S x S square of instance tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim) for size in (7, 5, 3)
        )

    def forward(self, x: Tensor, side: int) -> Tensor:
        cls_token, tokens = x[:1], x[1:]  # (1, D), (S*S, D)
        parts = [
            self._channels(tokens, side, channels)
            for channels in channel_chunks(tokens.shape[1], side * side)
        ]
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (S*S, D)
        return torch.cat([cls_token, tokens], dim=0)

    def _channels(self, tokens: Tensor, side: int, channels: slice) -> Tensor:
        """Channels ``channels`` of the encoded tokens: (S*S, c); channels are independent."""
        width = channels.stop - channels.start
        square = tokens[:, channels].T.reshape(1, width, side, side)  # (1, c, S, S)
        square = square + depthwise_sum(self.convs, square, channels)
        return square.reshape(width, side * side).T


class TransMIL(nn.Module):
    """``forward(features, coords) -> (logits, instance_scores)``; one bag per call."""

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, config.dim) * 0.02)
        self.layer1 = TransLayer(config)
        self.ppeg = PPEG(config.dim)
        self.layer2 = TransLayer(config)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.n_classes)

    def forward(self, features: Tensor, coords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features, _, batched = as_bag(features, coords)
        logits, scores = self._run(features)
        return bag_output(logits, batched), scores

    def _run(self, features: Tensor) -> tuple[Tensor, Tensor]:
        param = self.head.weight
        features = features.to(device=param.device, dtype=param.dtype)
        h = by_rows(self.embed, features, self.config.dim)  # (N, D)
        n = h.shape[0]
        side = math.isqrt(n - 1) + 1  # smallest S with S*S >= N
        source = torch.arange(side * side, device=h.device) % n  # (S*S,) padded -> original
        x = torch.cat([self.cls_token, h[source]], dim=0)  # (1 + S*S, D)
        x, _ = self.layer1(x)
        x = self.ppeg(x, side)
        x, weights = self.layer2(x, cls_weights=True)
        assert weights is not None
        logits = self.head(self.norm(x[0]))  # (C,)
        attention = weights[:, 0, 1:].mean(dim=0)  # (S*S,)
        scores = attention.new_zeros(n).index_add(0, source, attention)  # (N,)
        return logits, scores
