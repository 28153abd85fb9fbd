"""ABMIL: gated attention pooling (Ilse et al., 2018).

Each instance gets an attention weight a_i = softmax_i(w^T (tanh(V h_i) * sigm(U h_i)));
the bag is the weighted mean of the instance embeddings. Grid positions are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from analysis.mil.bag import as_bag, bag_output
from analysis.mil.evidence import contrast


@dataclass
class ABMILConfig:
    in_dim: int = 1024  # patch embedding size
    dim: int = 512  # instance embedding width after the input projection
    attn_dim: int = 256  # hidden width of the gated attention network
    n_classes: int = 2
    dropout: float = 0.0


class GatedAttention(nn.Module):
    """(N, D) -> (N,) attention logits, before the softmax."""

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = nn.Sequential(
            nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.score(self.tanh_branch(h) * self.gate_branch(h)).squeeze(1)  # (N,)


class ABMIL(nn.Module):
    """``forward(features, coords) -> (logits, instance_scores)``; scores are attention weights."""

    def __init__(self, config: ABMILConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(
            nn.Linear(config.in_dim, config.dim), nn.ReLU(), nn.Dropout(config.dropout)
        )
        self.attention = GatedAttention(config.dim, config.attn_dim, config.dropout)
        self.head = nn.Linear(config.dim, config.n_classes)

    def forward(self, features: Tensor, coords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features, _, batched = as_bag(features, coords)
        param = self.head.weight
        h = self.embed(features.to(device=param.device, dtype=param.dtype))  # (N, D)
        weights = self.attention(h).softmax(dim=0)  # (N,)
        logits = self.head(weights @ h)  # (C,)
        return bag_output(logits, batched), weights

    def instance_evidence(
        self, features: Tensor, coords: Tensor | None = None, target: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(C,) logits, (N,) attention and (N,) class evidence (``analysis.mil.evidence``)."""
        features, _, _ = as_bag(features, coords)
        param = self.head.weight
        h = self.embed(features.to(device=param.device, dtype=param.dtype))  # (N, D)
        weights = self.attention(h).softmax(dim=0)  # (N,)
        logits = self.head(weights @ h)  # (C,)
        target = int(logits.argmax()) if target is None else target
        return logits, weights, contrast(self.head(h), weights, target)
