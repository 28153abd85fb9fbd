"""CLAM-SB: single-branch gated attention MIL with instance-level clustering (Lu et al., 2021).

The bag branch is ABMIL's gated attention pooling. Training adds an instance loss: for the
true class c, the k most attended instances are pushed to "positive" and the k least attended
to "negative" by class c's own instance classifier; with ``subtyping`` the other classes'
classifiers also learn that the k most attended instances are not theirs. Total loss
``bag_weight * CE(bag) + (1 - bag_weight) * instance_loss`` (see ``analysis.train``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.mil.abmil import ABMILConfig, AttentionPooledMIL
from analysis.mil.bag import as_bag


@dataclass
class CLAMConfig(ABMILConfig):
    """ABMIL's fields (in_dim, dim, attn_dim, n_classes, dropout), then CLAM's own."""

    k_sample: int = 8  # instances taken from each end of the attention ranking
    instance_loss: str = "svm"  # "svm" (smooth top-1 SVM) or "ce"
    subtyping: bool = False  # also train other classes' classifiers on the top-k as negatives
    bag_weight: float = 0.7  # weight of the bag loss against the instance loss

    def __post_init__(self) -> None:
        if self.instance_loss not in ("svm", "ce"):
            raise ValueError(f"instance_loss must be 'svm' or 'ce', not {self.instance_loss!r}")


def smooth_svm_loss(
    logits: Tensor, targets: Tensor, alpha: float = 1.0, tau: float = 1.0
) -> Tensor:
    """Smooth top-1 multi-class SVM (Berrada et al., 2018), averaged: (M, C), (M,) -> ()."""
    margin = alpha * (1.0 - F.one_hot(targets, logits.shape[1]).to(logits.dtype))  # (M, C)
    true_score = logits.gather(1, targets[:, None])  # (M, 1)
    return (tau * torch.logsumexp((margin + logits - true_score) / tau, dim=1)).mean()


class CLAMSB(AttentionPooledMIL):
    """``forward(features, coords) -> (logits, instance_scores)``; plus ``forward_train``."""

    config: CLAMConfig

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        self.instance_heads = nn.ModuleList(
            nn.Linear(config.dim, 2) for _ in range(config.n_classes)
        )

    def _attend(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        param = self.head.weight
        h = self.embed(features.to(device=param.device, dtype=param.dtype))  # (N, D)
        weights = self.attention(h).softmax(dim=0)  # (N,)
        return h, weights, self.head(weights @ h)  # (N, D), (N,), (C,)

    def forward_train(
        self, features: Tensor, coords: Tensor | None, label: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One pass giving (logits (C,), instance_scores (N,), instance_loss ())."""
        features, _, _ = as_bag(features, coords)
        h, weights, logits = self._attend(features)
        return logits, weights, self._instance_loss(h, weights, int(label))

    def instance_loss(self, features: Tensor, coords: Tensor | None, label: int) -> Tensor:
        return self.forward_train(features, coords, label)[2]

    def _instance_loss(self, h: Tensor, weights: Tensor, label: int) -> Tensor:
        n = h.shape[0]
        k = min(self.config.k_sample, n // 2)
        if k == 0:  # one instance: nothing to contrast
            return h.sum() * 0.0
        order = torch.argsort(weights, descending=True)
        top, bottom = h[order[:k]], h[order[-k:]]  # (k, D) each
        losses = [self._instances(label, torch.cat([top, bottom]), [1] * k + [0] * k)]
        if self.config.subtyping:
            for other in range(self.config.n_classes):
                if other != label:
                    losses.append(self._instances(other, top, [0] * k))
        return torch.stack(losses).mean()

    def _instances(self, cls: int, h: Tensor, targets: list[int]) -> Tensor:
        logits = self.instance_heads[cls](h)  # (M, 2)
        target = torch.tensor(targets, device=h.device)
        if self.config.instance_loss == "ce":
            return F.cross_entropy(logits, target)
        return smooth_svm_loss(logits, target)
