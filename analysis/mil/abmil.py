"""ABMIL: gated attention pooling (Ilse et al., 2018).

Each instance gets an attention weight a_i = softmax_i(w^T (tanh(V h_i) * sigm(U h_i)));
the bag is the weighted mean of the instance embeddings. Grid positions are not used.

In low-memory mode (``analysis.mil.bag.low_memory``) the bag is pooled in row chunks: the
softmax over all instances is carried as a running max and sum, so no (N, D) tensor exists
and the result equals the one-pass pooling within float rounding. CLAM-SB pools the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from analysis.mil.bag import as_bag, bag_output, row_chunks
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


class Pooled(NamedTuple):
    pooled: Tensor  # (D,) attention-weighted mean of the instance embeddings
    weights: Tensor  # (N,) attention, softmax over the whole bag
    instance_logits: Tensor | None  # (N, C) the head on each instance's embedding, if asked


def attention_pool(
    embed: nn.Module,
    attention: GatedAttention,
    head: nn.Linear,
    features: Tensor,
    instance_logits: bool = False,
) -> Pooled:
    """Gated attention pooling of (N, in_dim) features; in row chunks in low-memory mode."""
    features = features.to(device=head.weight.device, dtype=head.weight.dtype)
    width = head.in_features + 3 * attention.score.in_features  # live values per instance
    chunks = row_chunks(features.shape[0], width)
    if len(chunks) > 1:
        return _attention_pool_in_chunks(embed, attention, head, features, chunks, instance_logits)
    h = embed(features)  # (N, D)
    weights = attention(h).softmax(dim=0)  # (N,)
    return Pooled(weights @ h, weights, head(h) if instance_logits else None)


def _attention_pool_in_chunks(
    embed: nn.Module,
    attention: GatedAttention,
    head: nn.Linear,
    features: Tensor,
    chunks: list[slice],
    instance_logits: bool,
) -> Pooled:
    """The same pooling, one chunk of instances at a time (an online softmax): the weighted sum
    and the softmax denominator are kept relative to the largest attention logit seen so far
    and rescaled when a larger one comes, so no exponential overflows."""
    running_max = features.new_tensor(float("-inf"))
    total = features.new_zeros(())  # sum of exp(logit - running_max)
    weighted = features.new_zeros(head.in_features)  # (D,) sum of exp(logit - running_max) h
    attention_logits, own_logits = [], []
    for rows in chunks:
        h = embed(features[rows])  # (c, D)
        logits = attention(h)  # (c,)
        new_max = torch.maximum(running_max, logits.max())
        rescale = torch.exp(running_max - new_max)  # 0 for the first chunk
        exp_logits = torch.exp(logits - new_max)  # (c,)
        total = total * rescale + exp_logits.sum()
        weighted = weighted * rescale + exp_logits @ h
        running_max = new_max
        attention_logits.append(logits)
        if instance_logits:
            own_logits.append(head(h))  # (c, C)
    weights = torch.exp(torch.cat(attention_logits) - running_max) / total  # (N,)
    return Pooled(weighted / total, weights, torch.cat(own_logits) if instance_logits else None)


class AttentionPooledMIL(nn.Module):
    """Prediction and class evidence of a model that pools ``embed``-ded instances with
    ``attention`` and classifies the pooled vector with ``head`` (ABMIL, CLAM-SB)."""

    def __init__(self, config: ABMILConfig) -> None:  # or CLAMConfig, which extends it
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(
            nn.Linear(config.in_dim, config.dim), nn.ReLU(), nn.Dropout(config.dropout)
        )
        self.attention = GatedAttention(config.dim, config.attn_dim, config.dropout)
        self.head = nn.Linear(config.dim, config.n_classes)

    def forward(self, features: Tensor, coords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features, _, batched = as_bag(features, coords)
        pooled = attention_pool(self.embed, self.attention, self.head, features)
        return bag_output(self.head(pooled.pooled), batched), pooled.weights  # (C,), (N,)

    def instance_evidence(
        self, features: Tensor, coords: Tensor | None = None, target: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(C,) logits, (N,) attention and (N,) class evidence (``analysis.mil.evidence``)."""
        features, _, _ = as_bag(features, coords)
        pooled = attention_pool(self.embed, self.attention, self.head, features, True)
        logits = self.head(pooled.pooled)  # (C,)
        assert pooled.instance_logits is not None
        target = int(logits.argmax()) if target is None else target
        return logits, pooled.weights, contrast(pooled.instance_logits, pooled.weights, target)


class ABMIL(AttentionPooledMIL):
    """``forward(features, coords) -> (logits, instance_scores)``; scores are attention weights."""

    config: ABMILConfig
