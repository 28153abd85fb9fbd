"""Class evidence per instance: what each patch contributes to one class's margin.

Attention says where a model looked; it is class-agnostic and sums to one over the slide, so
a benign slide still has "hot" cells. Class evidence is signed: for instance i with attention
a_i (softmax over the bag) and instance logits z_i (the model's readout head applied to that
instance's own representation), the evidence for class t is

    e_i = N * a_i * (z_i[t] - mean over c != t of z_i[c])

in logit units; its mean over the bag is exactly the bag's margin for t for the
attention-pooling models ABMIL and CLAM. Transformers (GLTrans, TransMIL) mix instances, so
their own readouts are not local; GLTrans instead reads each instance's value alone through
the CLS readout (``GLTrans.instance_evidence``). TransMIL gives attention only. Positive: the patch argues for
t; negative: against it. The class shown is ``evidence_target``: the predicted class, except
that when the prediction is a reference class (normal, benign, ...) the evidence shown is for
the most probable other class, so a benign slide's map is cold instead of "hot for normal".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

REFERENCE_CLASSES = frozenset({"0", "normal", "benign", "negative", "healthy", "no lesion"})


def evidence_target(classes: Sequence[str], probabilities: Sequence[float] | np.ndarray) -> int:
    """Index of the class whose evidence the map shows (see the module docstring)."""
    order = [int(i) for i in np.argsort(-np.asarray(probabilities, dtype=np.float64))]
    reference = {i for i, name in enumerate(classes) if name.strip().lower() in REFERENCE_CLASSES}
    if order[0] not in reference or len(reference) == len(classes):
        return order[0]
    return next(i for i in order if i not in reference)


def contrast(instance_logits: Tensor, attention: Tensor, target: int) -> Tensor:
    """(N, C) instance logits, (N,) attention -> (N,) evidence for ``target`` (logit units)."""
    n, n_classes = instance_logits.shape
    others = (instance_logits.sum(dim=1) - instance_logits[:, target]) / max(1, n_classes - 1)
    return n * attention * (instance_logits[:, target] - others)
