"""Which torch device the models run on, and the accelerator's memory.

One rule everywhere (``lowmag`` commands, the portal's workers, the benchmarks): an explicit
``--device`` wins, then the ``LOWMAG_DEVICE`` environment variable, then ``cuda`` when torch
sees a GPU, else ``cpu``. Every path that runs a model moves its inputs to the model's device
(``module_device``) and copies results back to the CPU once.
"""

from __future__ import annotations

import os
from typing import Any

from analysis.errors import AnalysisError

ENV_VAR = "LOWMAG_DEVICE"
AUTO = "auto"
DEVICE_HELP = (
    "torch device: auto (default: $LOWMAG_DEVICE, else cuda when present), cpu, cuda, cuda:N"
)


def resolve_device(device: str | None = None) -> str:
    """A torch device string: ``device``, else ``$LOWMAG_DEVICE``, else cuda when present."""
    import torch

    requested = (device or os.environ.get(ENV_VAR) or AUTO).strip().lower()
    if requested == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(requested)
    except (RuntimeError, ValueError):
        raise AnalysisError(
            f"unknown device {requested!r} (from --device or {ENV_VAR}); use auto, cpu, cuda "
            "or cuda:N"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise AnalysisError(
                f"device {requested!r} was asked for (--device or {ENV_VAR}) but torch sees no "
                "CUDA GPU here; use --device cpu, or install the CUDA build of torch"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise AnalysisError(
                f"device {requested!r} does not exist: torch sees "
                f"{torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise AnalysisError(f"device {requested!r} was asked for but MPS is not available here")
    return str(parsed)


def module_device(module: Any) -> Any:
    """The ``torch.device`` a module's weights live on (CPU for a module without any)."""
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: Any) -> None:
    """Wait for queued kernels on ``device`` (for honest timings); a no-op on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# How allocators other than CUDA's caching allocator report running out (CPU, MPS, cuBLAS).
OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device (or host) running out of memory, whatever the device."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(m in message for m in OUT_OF_MEMORY_MARKERS)


def release_cached_memory(device: Any) -> None:
    """Give the allocator's cached blocks back after an out-of-memory, before a retry."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def accelerator_memory() -> dict[str, Any]:
    """This process's GPU memory: present, allocated/reserved/peak/total bytes (zeros without)."""
    out: dict[str, Any] = {
        "present": False,
        "device": "",
        "allocated_bytes": 0,
        "reserved_bytes": 0,
        "peak_bytes": 0,
        "total_bytes": 0,
    }
    try:
        import torch
    except ImportError:  # the web image may run without torch
        return out
    if not torch.cuda.is_available():
        return out
    index = torch.cuda.current_device()
    out.update(
        present=True,
        device=torch.cuda.get_device_name(index),
        allocated_bytes=int(torch.cuda.memory_allocated(index)),
        reserved_bytes=int(torch.cuda.memory_reserved(index)),
        peak_bytes=int(torch.cuda.max_memory_allocated(index)),
        total_bytes=int(torch.cuda.get_device_properties(index).total_memory),
    )
    return out
