"""Process settings of mapex_core._env: freed activation memory goes back to the OS in inference processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# 64 blocks of 4 MiB, each followed by a small block that stays alive (as activations between
# long-lived tensors): after freeing the big ones, how much stays resident?
SCRIPT = r"""
import sys, torch
from mapex_core._env import return_freed_memory
if sys.argv[1] == "1":
    assert return_freed_memory()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
x = torch.ones(1 << 20); del x  # a freed 4 MiB block: glibc raises its mmap threshold to 4 MiB
base = rss()
big, small = [], []
for _ in range(64):
    big.append(torch.ones(1 << 20))
    small.append(torch.ones(64))
del big
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_return_freed_memory_gives_freed_blocks_back() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def retained(fixed: bool) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if fixed else "0"], env=env, capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    assert retained(fixed=False) >= 200  # glibc's default keeps ~256 MiB of freed blocks resident
    assert retained(fixed=True) <= 16


def test_user_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from mapex_core._env import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False


FAULTS = r"""
import resource, sys
import numpy as np
from mapex_core._env import SERVING_MMAP_THRESHOLD, return_freed_memory
assert return_freed_memory(int(sys.argv[1]) if sys.argv[1] != "serving" else SERVING_MMAP_THRESHOLD)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(65536, np.float32)  # warm-up: 256 KiB blocks, a 1-chip request's buffer size
before = faults()
for _ in range(500):
    np.ones(65536, np.float32)
small = faults() - before
big = [np.ones(1 << 20, np.float32) for _ in range(16)]  # 4 MiB blocks, as large activations
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
keep = rss()
del big
print(small, keep - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_serving_threshold_reuses_request_sized_blocks_and_still_returns_large_ones() -> None:
    """At 128 KiB every 256 KiB buffer is a fresh mmap (64 page faults each, every request); at the
    serving threshold it comes from the heap, while 4 MiB blocks still go back to the OS when freed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def run(arg: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, arg], env=env, capture_output=True, text=True, check=True)
        faults, returned_mb = out.stdout.split()
        return int(faults), int(returned_mb)

    faults_128k, _ = run(str(1 << 17))
    faults_serving, returned_mb = run("serving")
    assert faults_128k >= 500 * 60  # ~64 pages per 256 KiB block
    assert faults_serving < 500  # heap blocks, reused
    assert returned_mb >= 56  # of the 64 MiB freed
