"""MIL training: Adam + Lookahead, cross-entropy, model selection on validation macro-F1.

One bag (one slide) per optimisation step. Bags stay in host memory (or in their HDF5 files,
see ``analysis.features.H5Features``) and move to the training device one at a time, so a
cohort's features never have to fit in GPU memory at once. Augmentation: each training step sees the bag's
instances in a random order and, optionally, a random subset of them (positions travel with
their instances, so GLTrans' local branch still sees true neighbours). The model kept is the
one of the epoch with the best validation macro-F1 (ties: lower validation loss, then the
earlier epoch); training stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import Tensor, nn

from analysis.devices import is_out_of_memory, release_cached_memory
from analysis.errors import AnalysisError
from analysis.metrics import auc_score
from analysis.mil.bag import run_bag
from analysis.mil.clam import CLAMSB
from analysis.mil.registry import build_mil, mil_config_from_dict, mil_config_to_dict


class Bag(NamedTuple):
    """One slide as a MIL bag."""

    features: np.ndarray  # (N, D) float32 patch embeddings
    grid_rc: np.ndarray  # (N, 2) int (row, col) on the slide's patch grid
    label: int
    slide_id: str
    patient_id: str


@dataclass
class TrainConfig:
    lr: float = 1e-4  # Adam learning rate (paper)
    weight_decay: float = 1e-5  # Adam L2 weight decay (paper)
    epochs: int = 50  # upper bound; early stopping usually ends sooner
    patience: int = 10  # epochs without a better validation score before stopping
    lookahead_k: int = 6  # Lookahead: fast steps between slow-weight updates
    lookahead_alpha: float = 0.5  # Lookahead: slow weights move this fraction toward fast
    instance_subsample: float = 1.0  # fraction of a bag's instances kept per training step
    max_train_instances: int | None = None  # cap per training step (CPU speed, device memory)
    shuffle_instances: bool = True  # random instance order per training step (paper)
    seed: int = 0  # model init, bag order, instance order and subsets
    num_threads: int = 1  # torch intra-op threads while training
    device: str = "cpu"  # where the model trains ("cuda" where a GPU is available)
    standardize: bool = True  # train on features standardised per dimension (training bags'
    # mean and spread), folded into the model's first layer afterwards: it takes raw features

    def __post_init__(self) -> None:
        if not 0.0 < self.instance_subsample <= 1.0:
            raise ValueError(f"instance_subsample must be in (0, 1], got {self.instance_subsample}")
        if self.epochs < 1 or self.patience < 1 or self.lookahead_k < 1:
            raise ValueError("epochs, patience and lookahead_k must be at least 1")


@dataclass
class TrainResult:
    model: nn.Module  # best-validation weights, in eval mode
    mil_name: str
    mil_config: dict[str, Any]
    history: list[dict[str, float]]  # one row per epoch
    best_epoch: int  # 1-based
    best_val: dict[str, float] = field(default_factory=dict)


class Lookahead:
    """Lookahead (Zhang et al., 2019) around any optimizer.

    Every ``k`` inner steps the slow weights move ``alpha`` of the way toward the fast
    weights, and the fast weights restart from them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.step_count = 0
        self.slow_weights = [
            [p.detach().clone() for p in group["params"]] for group in optimizer.param_groups
        ]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.step_count += 1
        if self.step_count % self.k:
            return
        for group, slow_group in zip(self.optimizer.param_groups, self.slow_weights, strict=True):
            for fast, slow in zip(group["params"], slow_group, strict=True):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "slow_weights": [[w.clone() for w in group] for group in self.slow_weights],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]
        for mine, theirs in zip(self.slow_weights, state["slow_weights"], strict=True):
            for slow, saved in zip(mine, theirs, strict=True):
                slow.copy_(saved)


# --- bags as tensors ------------------------------------------------------------------------


class _TensorBag(NamedTuple):
    features: Tensor  # (N, D) float32
    grid_rc: Tensor  # (N, 2) long
    label: int


def _on_device(bag: Bag, device: str = "cpu") -> _TensorBag:
    """One bag as tensors on ``device``. Bags stay where they are (host memory, or an HDF5 file
    read only now for lazy ``H5Features``); only the bag being used visits the device."""
    return _TensorBag(
        torch.as_tensor(np.asarray(bag.features, dtype=np.float32)).to(device),
        torch.as_tensor(np.asarray(bag.grid_rc, dtype=np.int64)).to(device),
        int(bag.label),
    )


def _to_tensors(bags: Iterable[Bag], device: str = "cpu") -> list[_TensorBag]:
    return [_on_device(bag, device) for bag in bags]


def _step_instances(n: int, cfg: TrainConfig) -> int:
    """How many of a bag's ``n`` instances one training step sees."""
    keep = max(1, math.ceil(n * cfg.instance_subsample))
    return keep if cfg.max_train_instances is None else min(keep, cfg.max_train_instances)


def _augment(bag: _TensorBag, cfg: TrainConfig, rng: np.random.Generator) -> _TensorBag:
    """Random subset and order of a bag's instances (positions travel with them)."""
    n = bag.features.shape[0]
    keep = _step_instances(n, cfg)
    if keep == n and not cfg.shuffle_instances:
        return bag
    index = rng.permutation(n)[:keep]
    if not cfg.shuffle_instances:
        index.sort()
    index_t = torch.from_numpy(index).to(bag.features.device)
    return _TensorBag(bag.features[index_t], bag.grid_rc[index_t], bag.label)


# --- training -------------------------------------------------------------------------------


def resolve_mil_config(
    model_name: str, mil_config: dict[str, Any] | None, in_dim: int, n_classes: int
) -> dict[str, Any]:
    """Fill ``in_dim`` and ``n_classes`` from the data; refuse values that contradict it."""
    config = dict(mil_config or {})
    for key, value in (("in_dim", in_dim), ("n_classes", n_classes)):
        config.setdefault(key, value)
        if key == "in_dim" and config[key] != value:
            raise ValueError(f"{model_name} config in_dim={config[key]} but features are {value}-d")
    if config["n_classes"] < n_classes:
        raise ValueError(
            f"{model_name} config n_classes={config['n_classes']} but labels reach {n_classes - 1}"
        )
    return mil_config_to_dict(mil_config_from_dict(model_name, config))


def _bag_loss(model: nn.Module, bag: _TensorBag) -> Tensor:
    target = torch.tensor([bag.label], device=bag.features.device)
    if not isinstance(model, CLAMSB):
        logits, _ = model(bag.features, bag.grid_rc)
        return F.cross_entropy(logits.unsqueeze(0), target)
    logits, _, instance_loss = model.forward_train(bag.features, bag.grid_rc, bag.label)
    bag_weight = model.config.bag_weight
    bag_loss = F.cross_entropy(logits.unsqueeze(0), target)
    return bag_weight * bag_loss + (1.0 - bag_weight) * instance_loss


def _train_epoch(
    model: nn.Module,
    optimizer: Lookahead,
    bags: Sequence[Bag],
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> float:
    model.train()
    total = 0.0
    for i in rng.permutation(len(bags)):
        total += _train_step(model, optimizer, bags[i], cfg, rng)
    return total / len(bags)


def _train_step(
    model: nn.Module, optimizer: Lookahead, bag: Bag, cfg: TrainConfig, rng: np.random.Generator
) -> float:
    """One optimisation step on one bag; its loss.

    A backward pass cannot run in chunks with the same gradients, so a step the device has no
    memory for is not retried: it ends training with an ``AnalysisError`` that names the bag,
    the model and the device, and says what to change.
    """
    try:
        loss = _bag_loss(model, _augment(_on_device(bag, cfg.device), cfg, rng))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        reason = str(exc).splitlines()[0][:160]
    # Out of the except block the failed step's tensors are garbage: the cache can go.
    optimizer.zero_grad()
    release_cached_memory(cfg.device)
    n, dim = (int(v) for v in bag.features.shape)
    step = _step_instances(n, cfg)
    raise AnalysisError(
        f"{type(model).__name__} on {cfg.device} ran out of memory training on slide "
        f"{bag.slide_id}, a step of {step} of its {n} instances x {dim} features ({reason}); "
        f"a training step cannot run in chunks: cap the instances per step below {step} "
        "(max_train_instances in TrainConfig, lowmag crossval --max-instances), or train on a "
        "device with more memory (--device or LOWMAG_DEVICE)"
    )


def predict_logits(model: nn.Module, bags: Sequence[Bag]) -> np.ndarray:
    """(n_bags, C) logits in eval mode, instances in their given order. A bag the device has no
    memory for runs once more in chunks, with the same logits (``analysis.mil.bag.run_bag``)."""
    model.eval()

    def forward(feats: Tensor, coords: Tensor) -> Tensor:
        logits, _ = model(feats, coords)  # (C,)
        return logits.reshape(-1).float().cpu()

    return np.stack(
        [
            run_bag(
                model, bag.features, bag.grid_rc, forward, f"slide {bag.slide_id}'s bag"
            ).numpy()
            for bag in bags
        ]
    )


def predict_proba(model: nn.Module, bags: Sequence[Bag]) -> np.ndarray:
    """(n_bags, C) class probabilities."""
    return torch.softmax(torch.from_numpy(predict_logits(model, bags)), dim=1).numpy()


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss, macro-F1, accuracy and AUC of one set of bag logits."""
    logits_t = torch.from_numpy(logits)
    n_classes = logits.shape[1]
    probs = torch.softmax(logits_t, dim=1).numpy()
    predicted = probs.argmax(axis=1)
    return {
        "loss": float(F.cross_entropy(logits_t, torch.from_numpy(labels).long())),
        "macro_f1": float(
            f1_score(
                labels, predicted, labels=list(range(n_classes)), average="macro", zero_division=0
            )
        ),
        "accuracy": float((predicted == labels).mean()),
        "auc": auc_score(labels, probs),
    }


def _is_better(metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    if metrics["macro_f1"] != best["macro_f1"]:
        return metrics["macro_f1"] > best["macro_f1"]
    return metrics["loss"] < best["loss"]


def train_model(
    model_name: str,
    mil_config: dict[str, Any] | None,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    cfg: TrainConfig | None = None,
) -> TrainResult:
    """Train one MIL model; return it with the weights of its best validation epoch."""
    cfg = cfg or TrainConfig()
    if not train_bags or not val_bags:
        raise ValueError("training needs at least one training bag and one validation bag")
    n_classes = 1 + max(int(bag.label) for bag in [*train_bags, *val_bags])
    config = resolve_mil_config(
        model_name, mil_config, int(train_bags[0].features.shape[1]), max(2, n_classes)
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _fit(model_name, config, train_bags, val_bags, cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    model_name: str,
    config: dict[str, Any],
    train: Sequence[Bag],
    val: Sequence[Bag],
    cfg: TrainConfig,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_mil(model_name, config).to(cfg.device)
    scale = feature_scale(train) if cfg.standardize else None
    if scale is not None:
        train, val = _standardized(train, scale), _standardized(val, scale)
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = Lookahead(adam, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    val_labels = np.array([int(bag.label) for bag in val])
    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, cfg.epochs + 1):
        train_loss = _train_epoch(model, optimizer, train, cfg, rng)
        metrics = validation_metrics(predict_logits(model, val), val_labels)
        history.append({"epoch": epoch, "train_loss": train_loss, **_prefixed(metrics)})
        if _is_better(metrics, best):
            best, best_epoch = metrics, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    if scale is not None:
        fold_input_scale(model, *scale)
    model.eval()
    return TrainResult(model, model_name, config, history, best_epoch, dict(best or {}))


def feature_scale(bags: Sequence[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and spread of every instance of ``bags`` (float64; spread >= 1e-6).

    Patch embeddings often share a large per-dimension offset and differ by a small amount
    (a randomly initialised or self-calibrated encoder more than an ImageNet one); a MIL model
    trained on them as they are barely moves at the paper's learning rate.
    """
    total = sum(len(bag.features) for bag in bags)
    dim = int(bags[0].features.shape[1])
    mean, square = np.zeros(dim), np.zeros(dim)
    for bag in bags:
        x = np.asarray(bag.features, dtype=np.float64)
        mean += x.sum(axis=0)
        square += (x * x).sum(axis=0)
    mean /= max(total, 1)
    spread = np.sqrt(np.maximum(square / max(total, 1) - mean * mean, 0.0))
    return mean, np.maximum(spread, 1e-6)


class _StandardizedFeatures:
    """A bag's features seen as ``(x - mean) / spread``, computed when read (a lazy HDF5 bag
    stays on disk between uses)."""

    def __init__(self, features: Any, mean: np.ndarray, spread: np.ndarray) -> None:
        self.features, self.mean, self.spread = features, mean, spread
        self.shape = features.shape

    def __len__(self) -> int:
        return len(self.features)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = ((np.asarray(self.features, dtype=np.float64) - self.mean) / self.spread).astype(
            np.float32
        )
        return out if dtype is None else out.astype(dtype, copy=False)


def _standardized(bags: Sequence[Bag], scale: tuple[np.ndarray, np.ndarray]) -> list[Bag]:
    # array-like, read when used, as a lazy H5Features bag is
    return [
        bag._replace(features=cast(np.ndarray, _StandardizedFeatures(bag.features, *scale)))
        for bag in bags
    ]


@torch.no_grad()
def fold_input_scale(model: nn.Module, mean: np.ndarray, spread: np.ndarray) -> None:
    """Make a model trained on ``(x - mean) / spread`` take raw ``x``: its first layer (every
    registered MIL model starts with ``embed[0]``, a Linear on the features) absorbs the affine
    map exactly, so bundles, inference and evidence need nothing new."""
    first = model.embed[0]  # type: ignore[index]
    if not isinstance(first, nn.Linear):
        raise TypeError(f"{type(model).__name__}.embed[0] is not a Linear layer")
    weight = first.weight.double()  # (D, in_dim)
    folded = weight / torch.from_numpy(spread).to(weight)
    bias = first.bias.double() - folded @ torch.from_numpy(mean).to(weight)
    first.weight.copy_(folded.to(first.weight.dtype))
    first.bias.copy_(bias.to(first.bias.dtype))


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"val_{key}": value for key, value in metrics.items()}


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
