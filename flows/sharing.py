"""How an application's stages share the machine's cores beyond their fixed thread count: a stage run
beside another (the retrain runs compare@APP beside finetune@APP) once the stages running leave it room.

A stage's intra-op thread count is fixed for its phase (:func:`flows.pipeline.stage_threads`): it changes
its weights. Cores that free up go to more training runs at once instead: a second stage process here, and
inside compare@APP several comparison models at once (the board's ``.cores`` files).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from mapex_core import progress, runtime


def has_room(threads: int | None, also: Collection[str] = ()) -> bool:
    """Whether one more stage process of ``threads`` intra-op threads (``None``: every core) fits beside the
    stages running now: those of the run's board, and the stages ``also`` (about to start, or running).

    A 1-thread process always fits: single-threaded processes share cores without an OpenMP team of
    threads waiting at every step for a core that another process holds (BENCHMARKS.md: two 2-thread
    processes on 2 cores run 2x slower than two 1-thread ones).
    """
    n = threads or runtime.cpu_count()
    if n <= 1:
        return True
    board = progress.board()
    running = {r.name for r in board.snapshot() if r.state == "running"} if board is not None else set()
    return (len(running | set(also)) + 1) * n <= runtime.cpu_count()


@contextmanager
def beside(run: Callable[[], Any], threads: int | None, block: str, poll_s: float = 1.0) -> Iterator[None]:
    """Call ``run`` (a stage of ``threads`` intra-op threads) in a thread beside the block, which runs stage
    ``block``: as soon as :func:`has_room` says it fits beside ``block`` and the other stages running, at the
    latest when the block ends; wait for it after the block.

    It runs in a copy of the caller's context (the Prefect task run it belongs to). When the block fails,
    a stage not started yet is skipped and the block's error is raised; else the stage's error is raised
    after the block.
    """
    over, failed = threading.Event(), threading.Event()

    def side() -> Any:
        while not over.is_set() and not has_room(threads, also=[block]):
            over.wait(poll_s)
        return None if failed.is_set() else run()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="beside") as pool:
        future = pool.submit(contextvars.copy_context().run, side)
        try:
            yield
        except BaseException:
            failed.set()
            raise
        finally:
            over.set()
        future.result()
