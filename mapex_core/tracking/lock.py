"""The registry's lock: registrations and alias moves of the model registry run one at a time.

On a team's servers (``MAPEX_LOCK_URL``, which ``.cluster/env`` sets, or a PostgreSQL tracking store) it
is a PostgreSQL advisory lock, so retrains on any number of machines serialise their read-compare-move
of the aliases, and the server releases the lock of a process that dies. Otherwise it is the file
``mlflow/registry.lock`` of the project folder, for the local and the sqlite case. Used by
:mod:`~mapex_core.tracking.registry`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from mapex_core.tracking.store import STORE_DIR

_HELD: dict[str, list[Any]] = {}  # lock -> [threading.RLock, depth, open file or connection]: re-entrant in a process
_HELD_GUARD = threading.Lock()
LOCK_URL_ENV = "MAPEX_LOCK_URL"  # a PostgreSQL database whose advisory lock serialises the registry's writers
CONNECT_RETRY_S = 60  # PostgreSQL restarting: how long taking the lock tries to connect again
LOCK_WAIT_S = 600  # how long a registration waits for another one to finish before giving up (transient)
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"mapex-registry").digest()[:8], "big", signed=True)  # pg bigint


def lock_url() -> str | None:
    """The PostgreSQL database holding the registry lock: ``MAPEX_LOCK_URL`` (``.cluster/env`` sets it), else the
    tracking URI when it is a PostgreSQL store itself; ``None``: the local file lock."""
    url = os.environ.get(LOCK_URL_ENV) or mlflow.get_tracking_uri()
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        return f"postgresql://{rest}"  # libpq's URI: no SQLAlchemy driver suffix
    if os.environ.get(LOCK_URL_ENV):
        raise ValueError(f"{LOCK_URL_ENV}={_masked(url)!r}: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    return None


def _masked(url: str) -> str:
    """``url`` without its password (for messages)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _connect(url: str, within_s: float = CONNECT_RETRY_S) -> Any:
    """A connection to ``url``, trying again for ``within_s`` seconds while the server refuses (a restart)."""
    import psycopg2

    deadline = time.monotonic() + within_s
    while True:
        try:
            return psycopg2.connect(url, connect_timeout=10, application_name="mapex-registry-lock")
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _acquire_pg(url: str) -> Any:
    """A connection holding the registry's advisory lock (PostgreSQL drops it if this process dies)."""
    import psycopg2
    from psycopg2 import errors

    conn = None
    try:
        conn = _connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = '{LOCK_WAIT_S}s'")
            cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    except errors.LockNotAvailable as exc:
        conn.close()
        raise TimeoutError(f"registry lock on {_masked(url)}: not acquired within {LOCK_WAIT_S} s "
                           "(another registration holds it)") from exc
    except psycopg2.Error as exc:  # server down or restarting: worth a retry
        if conn is not None:
            conn.close()
        raise ConnectionError(f"registry lock on {_masked(url)}: {str(exc).strip()}") from exc
    return conn


def _release_pg(conn: Any) -> None:
    import psycopg2

    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    except psycopg2.Error:
        pass  # the connection is gone: so is its lock
    finally:
        conn.close()


@contextmanager
def registry_lock(root: str | Path = ".") -> Iterator[None]:
    """An exclusive lock around registrations and alias moves of the registry.

    On a team's servers (``MAPEX_LOCK_URL``, or a PostgreSQL tracking store) a PostgreSQL advisory lock:
    registrations on any number of machines run one at a time, and a killed process's lock is released
    by the server. Otherwise ``mlflow/registry.lock`` under ``root``: one project folder on one machine
    (the local and the sqlite case). Re-entrant within a process (a registration holds it while its
    gate takes it again).

    Raises:
        ConnectionError: the lock's database does not answer (transient).
        TimeoutError: another registration held it for ``LOCK_WAIT_S`` seconds (transient).
    """
    url = lock_url()
    key = f"pg:{_masked(url)}" if url else str((Path(root) / STORE_DIR / "registry.lock").resolve())
    with _HELD_GUARD:
        entry = _HELD.setdefault(key, [threading.RLock(), 0, None])
    with entry[0]:
        if entry[1] == 0:
            if url:
                entry[2] = _acquire_pg(url)
            else:
                Path(key).parent.mkdir(parents=True, exist_ok=True)
                f = open(key, "a")  # noqa: SIM115 - held across the yield, closed below
                try:
                    fcntl.flock(f, fcntl.LOCK_EX)
                except BaseException:
                    f.close()
                    raise
                entry[2] = f
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                if url:
                    _release_pg(entry[2])
                else:
                    fcntl.flock(entry[2], fcntl.LOCK_UN)
                    entry[2].close()
                entry[2] = None
