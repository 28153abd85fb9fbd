"""Models that behave like ones moved to a GPU, for machines without one.

Their weights live on torch's ``meta`` device (a real device that is not the CPU), so a caller
that forgets to move inputs to the model's device hands them over on the CPU, and the model
records it. What they return is an ``AcceleratorTensor``: CPU data that, like a CUDA tensor,
refuses ``.numpy()`` until it is copied back with ``.cpu()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FAKE_DEVICE = torch.device("meta")


class AcceleratorTensor(torch.Tensor):
    """A result still 'on the accelerator': ``.numpy()`` fails, ``.cpu()`` copies it back."""

    copies_back = 0  # how many times results were copied to the CPU

    def numpy(self, *args, **kwargs):  # type: ignore[override]
        raise TypeError(
            "can't convert accelerator device type tensor to numpy. Use Tensor.cpu() to copy the "
            "tensor to host memory first."
        )

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        AcceleratorTensor.copies_back += 1
        return self.as_subclass(torch.Tensor).clone()


def on_accelerator(tensor: torch.Tensor) -> AcceleratorTensor:
    return tensor.as_subclass(AcceleratorTensor)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(1, device=FAKE_DEVICE))  # where the "weights" are
        self.input_devices: list[torch.device] = []

    def _record(self, *tensors: torch.Tensor) -> None:
        self.input_devices.extend(t.device for t in tensors)

    @property
    def misplaced_inputs(self) -> list[torch.device]:
        return [d for d in self.input_devices if d != self.anchor.device]


class FakeAcceleratorMIL(_Recorder):
    """A MIL model 'on a GPU': ``forward(features, coords) -> (logits (1, C), scores (N,))``."""

    def __init__(self, n_classes: int = 2) -> None:
        super().__init__()
        self.n_classes = n_classes

    def forward(self, features: torch.Tensor, coords: torch.Tensor):
        self._record(features, coords)
        n = features.shape[0]
        logits = torch.linspace(-1.0, 1.0, self.n_classes).reshape(1, -1)
        scores = torch.linspace(0.0, 1.0, n)
        return on_accelerator(logits), on_accelerator(scores)


class FakeAcceleratorEncoderNet(_Recorder):
    """A patch encoder network 'on a GPU': (B, 3, H, W) -> (B, embed_dim)."""

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor):
        self._record(x)
        b = x.shape[0]
        rows = torch.arange(b * self.embed_dim, dtype=torch.float32).reshape(b, self.embed_dim)
        return on_accelerator(torch.sin(rows))


def out_of_memory(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {what}")


def cpu_out_of_memory(what: str) -> RuntimeError:
    """Host memory running out, as torch's CPU allocator reports it (a plain RuntimeError)."""
    return RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        f"memory: you tried to allocate {what}. Error code 12 (Cannot allocate memory)"
    )


class MemoryLimitedNet(nn.Module):
    """A real encoder network on a device with little memory: batches above ``max_batch``
    raise ``torch.OutOfMemoryError`` as CUDA does (or what ``error`` makes, e.g.
    ``cpu_out_of_memory``); smaller ones run the real network."""

    def __init__(
        self,
        net: nn.Module,
        max_batch: int,
        error: Callable[[str], RuntimeError] = out_of_memory,
    ) -> None:
        super().__init__()
        self.net = net
        self.max_batch = max_batch
        self.error = error
        self.embed_dim = net.embed_dim
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        if x.shape[0] > self.max_batch:
            raise self.error(f"{x.shape[0]} patches")
        return self.net(x)


def limit_attention_memory(monkeypatch, max_scores: int) -> list[int]:
    """Make every softmax attention whose score matrix holds more than ``max_scores`` values
    raise ``torch.OutOfMemoryError``; returns the list of score sizes that ran."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    ran: list[int] = []

    def limited(q, k, v, *args, **kwargs):
        scores = q.shape[:-1].numel() * k.shape[-2]
        if scores > max_scores:
            raise out_of_memory(f"{scores} attention scores")
        ran.append(scores)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", limited)
    return ran


class MemoryLimit:
    """What ``limit_memory`` saw: the size of every tensor op that ran, and how many it refused."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self.ran: list[int] = []
        self.refused = 0

    def check(self, values: int, what: str) -> None:
        if values > self.max_values:
            self.refused += 1
            raise out_of_memory(f"{values} values for {what}")
        self.ran.append(values)


def limit_memory(monkeypatch, max_values: int) -> MemoryLimit:
    """A device where any linear layer, convolution or attention whose result (for attention:
    whose score matrix) holds more than ``max_values`` values runs out of memory, as CUDA does.

    Every MIL model's large tensors come from these three ops, so a model that bounds its peak
    memory on a huge bag runs here in pieces, and one that does not raises
    ``torch.OutOfMemoryError``.
    """
    import torch.nn.functional as F

    limit = MemoryLimit(max_values)
    real_linear, real_conv2d = F.linear, F.conv2d
    real_attention = F.scaled_dot_product_attention

    def linear(x, weight, *args, **kwargs):
        limit.check(x.shape[:-1].numel() * weight.shape[0], "a linear layer")
        return real_linear(x, weight, *args, **kwargs)

    def conv2d(x, weight, *args, **kwargs):
        out = real_conv2d(x, weight, *args, **kwargs)
        limit.check(out.numel(), "a convolution")
        return out

    def attention(q, k, v, *args, **kwargs):
        limit.check(q.shape[:-1].numel() * k.shape[-2], "attention scores")
        return real_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(F, "conv2d", conv2d)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    return limit
