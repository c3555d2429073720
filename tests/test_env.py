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
