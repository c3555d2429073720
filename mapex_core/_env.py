"""Environment defaults applied before any heavy import: telemetry off, state kept local.

Each value is a default (``os.environ.setdefault``): an explicit setting by the user wins.
MLflow only honours ``DO_NOT_TRACK=true`` (not ``1``); Prefect and DVC accept it too.
"""

from __future__ import annotations

import os

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_quiet_defaults() -> None:
    """Switch off the telemetry of MLflow, Prefect, DVC and Great Expectations."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
# A server's per-request buffers (a 1-chip JSON body is 262 kB, its decoded arrays ~200 kB each) stay
# below this and come from the heap; activations of large batches or models are above it and still go
# back to the OS. At 128 KiB, every request's buffers were mmapped, page-faulted and unmapped again
# (with TLB shootdowns across the server's threads): ~2 ms more per 1-chip request (bench/serve.py).
SERVING_MMAP_THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = 1 << 17) -> bool:
    """Make this process give freed activation memory back to the OS (for inference processes).

    glibc serves large blocks with ``mmap`` (returned to the OS on free), but raises that threshold
    each time such a block is freed, up to 32 MiB. After a few forward passes, activation-sized
    blocks come from the heap and stay resident after they are freed: a batch-32 forward of a
    ViT-B-sized model peaked ~200 MB higher for that alone. Fixing the threshold
    (``mallopt(M_MMAP_THRESHOLD)``) keeps the peak near the live tensors. ``MALLOC_MMAP_THRESHOLD_``
    set by the user wins. Serving (with :data:`SERVING_MMAP_THRESHOLD`), ``mapex predict`` and the
    benchmarks' model processes call this; training does not (it reuses the same blocks every step).
    The heap's trim threshold is set to twice ``threshold``, as glibc's own dynamic rule does, so
    that freeing a block just under the threshold does not shrink the heap on every request
    (``MALLOC_TRIM_THRESHOLD_`` set by the user wins).

    Returns:
        True when the threshold was set (glibc), False otherwise (another C library: no-op).
    """
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.mallopt(M_MMAP_THRESHOLD, int(threshold)):
            return False
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(M_TRIM_THRESHOLD, 2 * int(threshold))
        return True
    except (OSError, AttributeError):
        return False
