"""Where computation runs: the torch device, and the CPUs a process has."""

from __future__ import annotations

import os
import re

THREADS_ENV = "OMP_NUM_THREADS"


def resolve_device(device: str):  # noqa: ANN201 - torch.device (torch is imported lazily)
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Raises:
        ValueError: an unknown device name, or CUDA requested where there is none.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share_threads(running: int) -> int:
    """Threads for each of ``running`` CPU-bound processes at once, so they do not oversubscribe."""
    return max(1, cpu_count() // max(1, running))
