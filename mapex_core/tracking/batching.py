"""Adaptive batching for the served model: concurrent requests gathered into one forward pass.

MLflow's scoring app runs each request's ``predict`` on a thread of its own (``asyncio.to_thread``).
Without batching, concurrent requests ran concurrent forwards, each with its own OpenMP team
(libgomp keeps one team per calling thread): on 2 cores, up to 6 forwards of 2 threads each spun
against each other and against the threads parsing JSON (BENCHMARKS.md, Serving).

A :class:`Batcher` runs every forward on one thread of its own, with one intra-op thread fewer than
torch's default (:func:`forward_threads`: the other core parses and answers requests meanwhile).
``MAPEX_SERVE_BATCH_THREADS`` gives a forward of several rows another count (a lone request keeps
the default): not the default, since two threads per batch made the batched server several times
slower at concurrency 8 on a loaded 2-core machine (BENCHMARKS.md, Serving). A
caller announces its request (:meth:`Batcher.request`), validates it in its own thread, and hands in
its arrays; the forward thread takes the oldest queued request and the compatible ones behind it, up
to ``max_batch`` rows, and waits at most ``max_wait_ms`` for more only while requests are on their
way: announced ones, and under ``mapex serve`` the requests its server has received and not yet
handed to the model (:func:`incoming`). A lone request is never delayed; under load the batch grows
with the clients. Each caller gets exactly its own rows of the output back, or the exception of its
own batch; a batch that fails is run again one request at a time, so one request cannot fail the
others.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_BATCH_ENV, MAX_WAIT_ENV = "MAPEX_SERVE_MAX_BATCH", "MAPEX_SERVE_MAX_WAIT_MS"
BATCH_THREADS_ENV = "MAPEX_SERVE_BATCH_THREADS"  # intra-op threads of a batch of several rows (unset: as one)
DEFAULT_MAX_BATCH = 64  # rows (chips): contract.MAX_CHIPS, so a batch is never larger than one valid request
DEFAULT_MAX_WAIT_MS = 2.0
MAX_MAX_BATCH, MAX_MAX_WAIT_MS = 4096, 1000.0

Arrays = dict[str, np.ndarray]
Forward = Callable[[Arrays], np.ndarray]
IDLE_S = 60.0  # the forward thread ends after this long without a request

_incoming = 0  # requests the server received and no batcher has taken yet (see incoming())
_incoming_lock = threading.Lock()
_TICKET: ContextVar[list[bool] | None] = ContextVar("mapex_serve_ticket", default=None)
_BATCHERS: weakref.WeakSet[Batcher] = weakref.WeakSet()


@contextmanager
def incoming() -> Iterator[None]:
    """Count one request, from its arrival at the server until a :class:`Batcher` announces it (or it is
    answered without reaching one): batchers wait for such requests, at most their ``max_wait_ms``.

    The server wraps each ``/invocations`` request in this; the count reaches the model's ``predict`` in
    the request's context (``asyncio.to_thread`` copies it).
    """
    global _incoming
    ticket = [True]
    with _incoming_lock:
        _incoming += 1
    token = _TICKET.set(ticket)
    try:
        yield
    finally:
        _TICKET.reset(token)
        if _redeem(ticket):  # never reached a batcher: stop them waiting for it
            for batcher in list(_BATCHERS):
                batcher._wake()


def _redeem(ticket: list[bool] | None) -> bool:
    """Take ``ticket``'s request out of the server's count; False when it was taken already."""
    global _incoming
    if not ticket:
        return False
    with _incoming_lock:
        if not ticket[0]:
            return False
        ticket[0] = False
        _incoming -= 1
    return True


def check_settings(max_batch: Any, max_wait_ms: Any, source: str = "") -> tuple[int, float]:
    """``(max_batch, max_wait_ms)`` as numbers, checked: 1 <= max_batch <= 4096 (1: no batching),
    0 <= max_wait_ms <= 1000.

    Raises:
        ValueError: a value out of range or not a number; the message names ``source`` (an option or
            environment variable) and the reason.
    """
    where = f" ({source})" if source else ""
    try:
        batch = int(str(max_batch).strip())
    except ValueError:
        raise ValueError(f"max batch{where} must be a whole number of rows, got {max_batch!r}") from None
    try:
        wait = float(str(max_wait_ms).strip())
    except ValueError:
        raise ValueError(f"max wait{where} must be a number of milliseconds, got {max_wait_ms!r}") from None
    if not 1 <= batch <= MAX_MAX_BATCH:
        raise ValueError(f"max batch{where} must be in [1, {MAX_MAX_BATCH}] rows (1: no batching), got {batch}")
    if not 0 <= wait <= MAX_MAX_WAIT_MS:  # (NaN fails too)
        raise ValueError(f"max wait{where} must be in [0, {MAX_MAX_WAIT_MS:g}] ms, got {max_wait_ms!r}")
    return batch, wait


def forward_threads() -> int:
    """Intra-op threads for the forward thread: all of torch's but one (at least 1), which is left to the
    threads that receive, parse and answer requests meanwhile (GIL-bound Python)."""
    import torch

    return max(1, torch.get_num_threads() - 1)


def settings_from_env(environ: dict[str, str] | None = None) -> tuple[int, float]:
    """``(max_batch, max_wait_ms)`` from ``MAPEX_SERVE_MAX_BATCH`` and ``MAPEX_SERVE_MAX_WAIT_MS`` (what
    ``mapex serve --max-batch/--max-wait-ms`` set; ``mlflow models serve`` passes the environment on),
    else the defaults.

    Raises:
        ValueError: a value that :func:`check_settings` refuses, naming the variable.
    """
    env = os.environ if environ is None else environ
    batch, wait = env.get(MAX_BATCH_ENV, str(DEFAULT_MAX_BATCH)), env.get(MAX_WAIT_ENV, str(DEFAULT_MAX_WAIT_MS))
    check_settings(batch, DEFAULT_MAX_WAIT_MS, MAX_BATCH_ENV)
    return check_settings(batch, wait, MAX_WAIT_ENV)


def batch_threads_from_env(environ: dict[str, str] | None = None) -> int | None:
    """Intra-op threads of a forward of several rows from ``MAPEX_SERVE_BATCH_THREADS`` (a whole number
    >= 1); ``None`` when unset or empty (the same as a lone request's, :func:`forward_threads`).

    Raises:
        ValueError: another value, naming the variable.
    """
    env = os.environ if environ is None else environ
    value = env.get(BATCH_THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{BATCH_THREADS_ENV} must be a whole number of threads >= 1, got {value!r}")
    return n


@dataclass(eq=False)
class _Item:
    arrays: Arrays
    rows: int
    key: tuple
    queued: float
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


def _key(arrays: Arrays) -> tuple:
    """What requests must share to be concatenated: modalities, per-row shapes and dtypes."""
    return tuple(sorted((m, a.shape[1:], a.dtype.str) for m, a in arrays.items()))


class Batcher:
    """Runs ``forward`` on one thread of its own, on batches of concurrent requests.

    Args:
        forward: maps a dict of arrays ``(N, ...)`` (one batch) to one array ``(N, ...)``, row ``i`` of
            the output belonging to row ``i`` of the inputs (rows must not interact).
        max_batch: the most rows in one batch (a larger request runs alone, whole).
        max_wait_ms: the longest a queued request waits for requests on their way to join its batch.
        threads: intra-op threads of the forward thread on a batch of one row (``"auto"``:
            :func:`forward_threads`; ``None``: torch's setting).
        batch_threads: the same on a batch of several rows (``None``: ``threads``).
    """

    def __init__(self, forward: Forward, max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, threads: int | str | None = "auto",
                 batch_threads: int | None = None) -> None:
        self.forward = forward
        self.threads = forward_threads() if threads == "auto" else threads
        self.batch_threads = self.threads if batch_threads is None else batch_threads
        self.switches = 0  # changes of the forward thread's intra-op threads (see _use_threads)
        self.max_batch, self.max_wait_ms = check_settings(max_batch, max_wait_ms)
        self.batches = self.requests = self.rows = 0  # forwards run, and the requests and rows in them
        self._reset()
        _BATCHERS.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._arriving = 0  # announced requests not yet queued
        self._thread: threading.Thread | None = None  # started by the first request, ends after IDLE_S idle
        self._pid = os.getpid()

    @contextmanager
    def request(self) -> Iterator[Callable[[Arrays], np.ndarray]]:
        """Announce a request; yields ``run(arrays) -> rows``: queue the request's validated arrays
        ``(B, ...)`` and wait for its ``B`` rows of the output. Leaving the block without calling
        ``run`` (a request refused by validation) withdraws the announcement."""
        if self._pid != os.getpid():  # a forked process: a queue and thread of its own
            self._reset()
        with self._cond:
            self._arriving += 1
        _redeem(_TICKET.get())  # counted by the server until now, by this batcher from here
        pending = [True]

        def run(arrays: Arrays) -> np.ndarray:
            rows = {int(a.shape[0]) for a in arrays.values()}
            if len(rows) != 1:
                raise ValueError(f"a batched request needs arrays of one batch size, got {sorted(rows)}")
            item = _Item(arrays, rows.pop(), _key(arrays), time.perf_counter())
            with self._cond:
                self._arriving -= 1
                pending[0] = False
                self._queue.append(item)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="mapex-batcher", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
            item.done.wait()
            if item.error is not None:
                raise item.error
            return item.result

        try:
            yield run
        finally:
            if pending[0]:
                with self._cond:
                    self._arriving -= 1
                    self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _take(self) -> list[_Item]:
        """The next batch (under the lock, the queue not empty): the oldest request and the compatible ones
        queued behind it, waiting for requests on their way while there is room and time."""
        first = self._queue[0]
        deadline = first.queued + self.max_wait_ms / 1000
        while True:
            batch, rows = [first], first.rows
            for item in list(self._queue)[1:]:  # in queue order; other shapes wait for a batch of their own
                if item.key != first.key:
                    continue
                if rows + item.rows > self.max_batch:
                    break
                batch.append(item)
                rows += item.rows
            left = deadline - time.perf_counter()
            if rows >= self.max_batch or not (self._arriving or _incoming) or left <= 0:
                break
            self._cond.wait(left)
        for item in batch:
            self._queue.remove(item)
        return batch

    def _use_threads(self, n: int | None, current: int | None, default: int) -> int | None:
        """Give the forward thread (the caller) ``n`` intra-op threads unless it has them (``current``),
        leaving torch's default for new threads at ``default``; ``n``, or ``current`` when ``n`` is None."""
        if n is None or n == current:
            return current
        import torch

        torch.set_num_threads(n)  # this thread's OpenMP team, and torch's default for new threads:
        if n != default:
            restore = threading.Thread(target=torch.set_num_threads, args=(default,))  # that default back
            restore.start()
            restore.join()
        self.switches += 1
        return n

    def _loop(self) -> None:
        """The forward thread: batches until the queue has stayed empty for ``IDLE_S`` (then it ends, and
        the next request starts another: a model that is no longer used can be freed). A batch of one row
        runs with :attr:`threads` intra-op threads, one of several with :attr:`batch_threads`."""
        import torch

        default = torch.get_num_threads()  # torch's default (a new thread starts with it)
        current = self._use_threads(self.threads, None, default)
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._queue, timeout=IDLE_S):
                    self._thread = None
                    return
                batch = self._take()
            rows = sum(it.rows for it in batch)
            current = self._use_threads(self.threads if rows == 1 else self.batch_threads, current, default)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        """Run one batch and hand each request its rows; a failed batch of several runs one by one."""
        try:
            if len(batch) == 1:
                out = self.forward(batch[0].arrays)
            else:
                out = self.forward({m: np.concatenate([it.arrays[m] for it in batch]) for m in batch[0].arrays})
            total = sum(it.rows for it in batch)
            if not isinstance(out, np.ndarray) or out.ndim == 0 or out.shape[0] != total:
                raise ValueError(f"the batched forward answered {getattr(out, 'shape', type(out))} for {total} rows")
            self.batches += 1
            self.requests += len(batch)
            self.rows += total
            start = 0
            for it in batch:  # row ranges in queue order: exactly each request's own rows
                it.result = out[start:start + it.rows]  # (B_i, ...)
                start += it.rows
                it.done.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting callers, never lost
            if len(batch) > 1:
                for it in batch:
                    self._run([it])
                return
            batch[0].error = exc
            batch[0].done.set()
