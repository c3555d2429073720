"""Progress of the pipeline's stages, for the person at the terminal, and the CPU cores shared among them.

The retrain flow runs each stage as its own process. Two small files connect the flow and a stage:

* the stage writes its progress (``done``, ``total``, ``info``) to the JSON file named by
  ``MAPEX_PROGRESS`` (:class:`StageChannel`; the ``mapex`` commands do it from their progress
  callbacks, throttled to a few writes a second);
* the flow writes the number of CPU cores the stage may use now to the same path plus ``.cores``:
  its share of the machine among the stages running at that moment, so when the others finish, the
  last one running gets every core (:func:`available_cores`). compare@APP (run beside finetune@APP)
  uses them to train the evaluation's comparison models at once. A stage's intra-op thread count (``OMP_NUM_THREADS``) is fixed when it
  starts and never changes: a different thread count gives different weights (floating-point sums in
  another order), and a stage's output must not depend on what ran beside it.

:class:`StageBoard` is the flow's side: every stage of the run with its state (waiting, running,
cached, done, failed), start and end time and latest progress. The ``mapex retrain`` command shows
it live (a terminal) or as one log line per stage start and end (no terminal).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapex_core.io import atomic_write_json, atomic_write_text
from mapex_core.runtime import THREADS_ENV, cpu_count, share_threads

CHANNEL_ENV = "MAPEX_PROGRESS"
STATES = ("waiting", "running", "cached", "done", "failed")


class StageChannel:
    """A stage process's side: report progress, read how many cores the flow gives it now.

    Args:
        path: the progress file (``MAPEX_PROGRESS``); the cores are read from ``path.cores``.
        every: least seconds between two progress writes (the last step is always written).
    """

    def __init__(self, path: str | Path, every: float = 0.5) -> None:
        self.path = Path(path)
        self.cores_file = Path(f"{self.path}.cores")
        self.every = every
        self._written = 0.0

    @classmethod
    def from_env(cls) -> StageChannel | None:
        """The channel of this process when the flow started it with one, else ``None``."""
        path = os.environ.get(CHANNEL_ENV)
        return cls(path) if path else None

    def report(self, done: int, total: int | None, info: str = "") -> None:
        """Record progress (throttled to one write every ``every`` seconds, and the last step)."""
        now = time.monotonic()
        if now - self._written >= self.every or (total is not None and done >= total):
            self._written = now
            with suppress(OSError):  # progress is a courtesy: never fail a stage over it
                atomic_write_json(self.path, {"done": done, "total": total, "info": info}, indent=None)

    def cores(self) -> int | None:
        """The cores the flow gives this stage now, or ``None`` when it has said nothing."""
        try:
            text = self.cores_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and int(text) > 0 else None


def available_cores() -> int:
    """CPU cores this process may keep busy now: its share from the retrain flow when the flow runs it
    (:class:`StageChannel`), else every CPU it may run on."""
    channel = StageChannel.from_env()
    return (channel.cores() if channel is not None else None) or cpu_count()


@dataclass
class StageRow:
    """One stage of a run as the board shows it."""

    name: str
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    done: int | None = None
    total: int | None = None
    info: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def elapsed(self) -> float | None:
        """Seconds it ran (so far, while running)."""
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started


class StageBoard:
    """The flow's side: the stages of a run, their states and progress, and the cores they may use.

    Args:
        stages: the planned stages, in display order (others are added when they start).
        on_change: called with the row after every state change (e.g. to log a line).
    """

    def __init__(self, stages: list[str] | None = None, on_change: Callable[[StageRow], None] | None = None) -> None:
        self.rows: dict[str, StageRow] = {s: StageRow(s) for s in stages or []}
        self.on_change = on_change
        self.folder = Path(tempfile.mkdtemp(prefix="mapex-progress-"))
        self._lock = threading.Lock()

    def close(self) -> None:
        """Remove the channel files."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def channel(self, stage: str) -> Path:
        """The progress file of ``stage`` (a file name cannot hold ``@`` portably: it becomes ``_``)."""
        return self.folder / (stage.replace("@", "_").replace("/", "_") + ".json")

    def start(self, stage: str, threads: int | None = None) -> dict[str, str]:
        """Mark ``stage`` running; returns the environment its process needs: its progress file and,
        when given (and the user has not set ``OMP_NUM_THREADS``), its intra-op ``threads``."""
        with self._lock:
            row = self.rows.setdefault(stage, StageRow(stage))
            row.state, row.started, row.ended = "running", time.monotonic(), None
            row.done = row.total = None
            row.info = ""
            self.channel(stage).unlink(missing_ok=True)
            self._rebalance()
        self._changed(row)
        return {CHANNEL_ENV: str(self.channel(stage))} | stage_threads_env(threads)

    def finish(self, stage: str, state: str, **extra: Any) -> None:
        """Mark ``stage`` ``done``, ``cached`` or ``failed`` (``extra``: what to show with it)."""
        if state not in STATES:
            raise ValueError(f"unknown stage state {state!r}; known: {STATES}")
        with self._lock:
            row = self.rows.setdefault(stage, StageRow(stage))
            self._read_progress(row)
            now = time.monotonic()
            row.state, row.ended, row.extra = state, now, extra
            if row.started is None:
                row.started = now
            self._rebalance()
        self._changed(row)

    def snapshot(self) -> list[StageRow]:
        """The rows now, with the running stages' latest progress."""
        with self._lock:
            for row in self.rows.values():
                if row.state == "running":
                    self._read_progress(row)
            return [StageRow(**{**r.__dict__, "extra": dict(r.extra)}) for r in self.rows.values()]

    def _read_progress(self, row: StageRow) -> None:
        try:
            p = json.loads(self.channel(row.name).read_text())
        except (OSError, ValueError):
            return
        row.done, row.total, row.info = p.get("done"), p.get("total"), str(p.get("info") or "")

    def _rebalance(self) -> None:
        """Give every running stage its share of the cores (a ``.cores`` file each)."""
        running = [r for r in self.rows.values() if r.state == "running"]
        share = share_threads(len(running))
        for row in running:
            with suppress(OSError):
                atomic_write_text(f"{self.channel(row.name)}.cores", f"{share}\n")

    def _changed(self, row: StageRow) -> None:
        if self.on_change is not None:
            self.on_change(row)


def stage_threads_env(threads: int | None) -> dict[str, str]:
    """``{"OMP_NUM_THREADS": threads}`` for a stage process, unless the user set it (theirs wins) or ``None``."""
    if threads is None or THREADS_ENV in os.environ:
        return {}
    return {THREADS_ENV: str(max(1, threads))}


_current: StageBoard | None = None


def board() -> StageBoard | None:
    """The board of the run in progress in this process (``None`` when nobody watches)."""
    return _current


@contextmanager
def use_board(b: StageBoard) -> Iterator[StageBoard]:
    """Make ``b`` the board that :func:`board` returns inside the block (then close it)."""
    global _current
    previous, _current = _current, b
    try:
        yield b
    finally:
        _current = previous
        b.close()


def format_seconds(seconds: float | None) -> str:
    """``1m05s`` / ``12s`` / ``-``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextmanager
def command_progress(label: str, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """``update(done, total, info="")`` for a long command: a bar on standard error when it is a
    terminal (unless ``quiet``), and the stage's progress file when the retrain flow runs the command."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    channel = StageChannel.from_env()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), disable=quiet or not sys.stderr.isatty(),
                   console=Console(stderr=True))
    with bar:
        task = bar.add_task(label, total=None, info="")

        def update(done: int, total: int | None, info: str = "") -> None:
            bar.update(task, completed=done, total=total, info=info)
            if channel is not None:
                channel.report(done, total, info)

        yield update


def step_info(info: dict[str, Any]) -> str:
    """A training step's progress text: ``loss 0.1234  lr 1.00e-04  (run)``."""
    parts = [f"loss {info['loss']:.4f}" if isinstance(info.get("loss"), float) else "",
             f"lr {info['lr']:.2e}" if "lr" in info else "", str(info.get("run", ""))]
    return "  ".join(p for p in parts if p)
