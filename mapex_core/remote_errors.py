"""Remote storage that does not answer, named: a DVC remote or MLflow's artifact store that is down becomes
:class:`RemoteUnavailable`, whose message says which remote, at which endpoint, and why ("DVC remote 'cluster'
s3://mapex/dvc at http://127.0.0.1:8333 unreachable: Could not connect to the endpoint URL: ..."). It is a
``ConnectionError`` (errno ``ECONNREFUSED``): a command exits 75 with it (:func:`mapex_core.errors.exit_status`)
and the flows retry it (:func:`flows.pipeline.is_transient`).

What counts as "does not answer" (:func:`unreachable_reason`): a refused, reset or timed-out connection anywhere in
the exception's chain (botocore, aiohttp, requests and urllib3 wrap them; their classes are recognised by name, so
this module imports none of them, nor MLflow), an S3 answer 5xx, an MLflow request that failed after its own
retries, or DVC's "N files failed to upload/download" (DVC logs the cause and drops it) when the endpoint refuses
a TCP connection right after.

Wrap the calls: ``with dvc_remote_errors(root): repo.push()`` (the remote is read from the repository's DVC
configuration only when something failed), ``with remote_errors("MLflow artifact store", uri, tracking_uri): ...``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                      errno.ENETUNREACH, errno.EHOSTDOWN, errno.EPIPE}
# exceptions of botocore, aiohttp, requests and urllib3 that mean "no answer from the endpoint" (matched by name)
UNREACHABLE_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                     "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "NewConnectionError",
                     "ProxyConnectionError", "ConnectTimeout", "ReadTimeout"}
TRANSFER_FAILED = {"UploadError", "DownloadError"}  # DVC's "N files failed to ..." (the cause only in its log)
PROBE_TIMEOUT_S = 3.0


class RemoteUnavailable(ConnectionError):
    """A remote store did not answer: ``remote`` (its kind and name), ``url``, ``endpoint`` and ``reason``."""

    def __init__(self, remote: str, url: str, endpoint: str | None, reason: str) -> None:
        self.remote, self.url, self.endpoint, self.reason = remote, url, endpoint, reason
        where = f"{remote} {url}" + (f" at {endpoint}" if endpoint else "")
        super().__init__(errno.ECONNREFUSED, f"{where} unreachable: {reason}")

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by Prefect with a failed task's state
        return (type(self), (self.remote, self.url, self.endpoint, self.reason))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts (each once)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [e for e in (cur.__cause__, cur.__context__) if e is not None]


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _server_error(exc: BaseException) -> bool:
    """An S3 answer 5xx (botocore ``ClientError``) or an MLflow request that failed after its retries."""
    names = _names(exc)
    if "ClientError" in names and isinstance(getattr(exc, "response", None), dict):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")  # type: ignore[attr-defined]
        return isinstance(status, int) and status >= 500
    if "MlflowException" in names:
        text = str(exc)
        return (getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE" or "failed with exception" in text
                or "failed with timeout exception" in text)
    return False


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``endpoint`` (an ``http(s)://host:port`` URL) refuses a TCP connection, or ``None`` when it accepts one."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parts.hostname}:{port}: {exc.strerror or exc}"


def unreachable_reason(exc: BaseException, endpoint: str | None = None) -> str | None:
    """Why ``exc`` means the remote did not answer (the message of the most telling exception in its chain), or
    ``None`` when it is something else (a missing object, bad credentials, a bug)."""
    for cur in _chain(exc):
        if isinstance(cur, RemoteUnavailable):
            return cur.reason
        if _names(cur) & UNREACHABLE_NAMES or _server_error(cur):
            return str(cur).strip() or type(cur).__name__
        if isinstance(cur, OSError) and cur.errno in UNREACHABLE_ERRNOS or isinstance(cur, socket.timeout):
            return str(cur).strip() or type(cur).__name__
    if _names(exc) & TRANSFER_FAILED and endpoint:
        refused = probe(endpoint)
        if refused is not None:
            return f"{exc} ({refused})"
    return None


@contextmanager
def remote_errors(remote: str, url: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn a failure of the block that means ``remote`` (e.g. ``"MLflow artifact store"``) at ``url`` did not
    answer into :class:`RemoteUnavailable` naming it; anything else passes unchanged.

    Raises:
        RemoteUnavailable: the remote did not answer (transient).
    """
    try:
        yield
    except RemoteUnavailable:
        raise
    except Exception as exc:
        reason = unreachable_reason(exc, endpoint)
        if reason is None:
            raise
        raise RemoteUnavailable(remote, url, endpoint, reason) from exc


def dvc_remote(root: str | Path = ".", name: str | None = None) -> tuple[str, str, str | None]:
    """The DVC remote ``name`` (default: the repository's default remote) of the repository at ``root``, from its
    configuration (``.dvc/config`` and ``.dvc/config.local``): its name, URL and endpoint (``None``: AWS's own).

    Raises:
        ValueError: no such remote, or no default remote (names the repository).
    """
    from dvc.config import Config

    config = Config(dvc_dir=str(Path(root) / ".dvc"))
    name = name or config.get("core", {}).get("remote")
    remotes = config.get("remote", {})
    if not name or name not in remotes:
        raise ValueError(f"{Path(root).resolve()}: no DVC remote {name!r} (remotes: {sorted(remotes)}); "
                         "`dvc remote add --default` one")
    return name, remotes[name]["url"], remotes[name].get("endpointurl")


@contextmanager
def dvc_remote_errors(root: str | Path = ".", name: str | None = None) -> Iterator[None]:
    """:func:`remote_errors` for ``dvc push`` / ``dvc pull`` in the repository at ``root`` (remote ``name``, default
    its default remote); the remote's URL and endpoint are read from its configuration when the block failed.

    Raises:
        RemoteUnavailable: the remote did not answer ("DVC remote 'cluster' s3://mapex/dvc at http://... unreachable:
            ...", transient).
    """
    try:
        yield
    except RemoteUnavailable:
        raise
    except Exception as exc:
        try:
            remote, url, endpoint = dvc_remote(root, name)
        except Exception:  # noqa: BLE001 - no readable remote configuration: the original error says more
            remote = url = endpoint = None
        reason = unreachable_reason(exc, endpoint) if url else None
        if reason is None:
            raise
        raise RemoteUnavailable(f"DVC remote {remote!r}", str(url), endpoint, reason) from exc
