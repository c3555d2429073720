"""The REST server of ``mapex serve``: MLflow's scoring app behind a guard, on uvicorn.

The scoring app is MLflow's own (:func:`mlflow.pyfunc.scoring_server.init`: ``/ping``, ``/health``,
``/version``, ``POST /invocations``, its request timeout and response format). :class:`GuardedApp`
wraps it, so that every malformed request gets a short 4xx and the connection stays usable:

* ``/invocations`` takes ``Content-Type: application/json`` only (else 415), a non-empty UTF-8 body
  of at most ``max_body`` bytes (else 413, answered before the body is read when ``Content-Length``
  says so), nested at most :data:`MAX_JSON_DEPTH` levels (else 400: a deeply nested body made
  MLflow's JSON parser hit Python's recursion limit, a 500 that dropped the connection);
* every error answer is ``{"error_code": ..., "message": ...}`` with a one-line message of at most
  :data:`MESSAGE_CHARS` characters: MLflow's messages echo the request (``Failed to predict data
  '<the inputs>'``, ``Input: <the whole body>``); those parts are cut, what the model said is kept;
* an exception inside the app becomes a 500 with a short message (the traceback goes to the
  server's log), not a dropped connection.

The guard also counts each ``/invocations`` request from its arrival until the model takes it
(:func:`mapex_core.tracking.batching.incoming`), so that the model's batcher waits for requests on
their way, and gives MLflow's ``asyncio.to_thread`` :data:`REQUEST_THREADS` threads (asyncio's
default is 6 on 2 cores, too few for concurrent requests to share a forward).

:func:`serve_model` downloads one registered version, checks its task model folder (before any
weight is loaded), sets the batching options for the model, and runs uvicorn on it (uvloop +
httptools when installed; ``UVICORN_LOOP`` and ``UVICORN_HTTP`` choose others, as uvicorn's own
command does). By default it runs one worker process per CPU core this process may use
(:func:`serve_workers`), each loading the model and batching its own requests: on 2 cores two
workers answered 1.5x the requests/s of one at concurrency 8 (BENCHMARKS.md, Serving). Each
worker says how its requests shared forward passes when it stops (ASGI lifespan shutdown); a worker
that cannot load the model stops the server with an error instead of being restarted in a loop.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mapex_core.errors import MapexError
from mapex_core.runtime import THREADS_ENV, cpu_count, share_threads
from mapex_core.tracking.batching import incoming

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_DEPTH = 32  # a request is {"inputs": {modality: [[[[...]]]]}, "params": {...}}: depth 6
MESSAGE_CHARS = 500  # of an error message
MIN_MAX_BODY = 32 << 20  # the smallest default body limit (bytes)
MODEL_ENV, MAX_BODY_ENV = "MAPEX_SERVE_MODEL", "MAPEX_SERVE_MAX_BODY"  # what worker processes load
FAILED_ENV = "MAPEX_SERVE_FAILED"  # where a worker process that cannot load the model says why
REQUEST_THREADS = 64  # threads running MLflow's request handling (and waiting on batches): 64 1-chip requests
INVOCATIONS = "/invocations"
_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE",
          415: "UNSUPPORTED_MEDIA_TYPE", 504: "TIMEOUT"}
_KEEP = b'[]{}"'
_DELETE = bytes(c for c in range(256) if c not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_log = logging.getLogger("mapex.serve")


def json_depth(body: bytes) -> int:
    """How deeply ``body`` (JSON text) nests arrays and objects, without parsing it (brackets in strings
    do not count). Linear, in C: about 1 ms per MB without escapes."""
    import numpy as np

    if b"\\" in body:  # escapes (none in the compact form: its 2 replaces were most of the time)
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = body.translate(None, _DELETE)  # brackets and quotes
    if b'"' in s:
        s = _STRING.sub(b"", s)
    if not s:
        return 0
    a = np.frombuffer(s, dtype=np.uint8)
    return int(np.cumsum(np.where((a == ord("[")) | (a == ord("{")), 1, -1), dtype=np.int64).max())


def short_message(message: str) -> str:
    """``message`` without the parts of MLflow's messages that echo the request, on one line, capped."""
    if message.startswith("Failed to predict data ") and "\nError: " in message:
        message = message.rpartition("\nError: ")[2]  # what the model said, after the echoed inputs
    message = message.partition("\nInput:")[0]  # MLflow's JSON decode error appends the whole body
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."


def error_body(status: int, body: bytes = b"", message: str | None = None) -> bytes:
    """The JSON error answer ``{"error_code", "message"}`` for ``status``: ``message``, or the one an inner
    answer ``body`` holds (MLflow's ``message``, FastAPI's ``detail``, or plain text), shortened."""
    code = None
    if message is None:
        data: Any = None
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            code = data.get("error_code") if isinstance(data.get("error_code"), str) else None
            message = data.get("message", data.get("detail"))
        if not isinstance(message, str):
            message = body[: 4 * MESSAGE_CHARS].decode("utf-8", "replace") if data is None else str(message)
    code = code or _CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
    return json.dumps({"error_code": code, "message": short_message(message) or f"HTTP {status}"}).encode()


class GuardedApp:
    """The ASGI app that guards MLflow's scoring app (see the module docstring).

    Args:
        app: the inner ASGI app.
        max_body: the largest request body accepted on ``/invocations``, in bytes.
        max_depth: the deepest JSON nesting accepted.
        on_shutdown: called when the server shuts down (ASGI lifespan shutdown), before the inner app hears of it.
    """

    def __init__(self, app: ASGIApp, max_body: int, max_depth: int = MAX_JSON_DEPTH,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.app, self.max_body, self.max_depth = app, int(max_body), int(max_depth)
        self.on_shutdown = on_shutdown
        self._loop: Any = None  # the event loop given REQUEST_THREADS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.on_shutdown is not None:
                receive = _on_shutdown(receive, self.on_shutdown)
            await self.app(scope, receive, send)  # lifespan
            return
        if scope["path"] == INVOCATIONS and scope["method"] == "POST":
            self._use_request_threads()
            with incoming():  # batchers wait for it (mapex_core.tracking.batching)
                body, refusal = await self._read(scope, receive)
                if refusal is not None:
                    await _answer(send, *refusal)
                    return
                if body is None:  # the client went away
                    return
                await self._guarded(scope, _replay(body, receive), send)
            return
        await self._guarded(scope, receive, send)

    def _use_request_threads(self) -> None:
        """Give this event loop a pool of :data:`REQUEST_THREADS` threads for MLflow's ``asyncio.to_thread``
        (asyncio's default has ``min(32, cores + 4)``: 6 on 2 cores, too few to batch 8 clients)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            from concurrent.futures import ThreadPoolExecutor

            loop.set_default_executor(ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="mapex-request"))
            self._loop = loop

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes | None, tuple[int, str] | None]:
        """The request body, or why it is refused ``(status, message)``; ``(None, None)`` on a disconnect."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctype = headers.get("content-type")
        mime = (ctype or "").split(";")[0].strip().lower()
        if mime != "application/json":
            got = f"got {ctype[:60]!r}" if ctype else "none was given"
            return None, (415, f"Content-Type must be application/json; {got}")
        limit = f"{self.max_body / 2**20:.1f} MiB (mapex serve --max-body-mb)"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None, (413, f"request body of {int(length) / 2**20:.1f} MiB exceeds the limit of {limit}; "
                               "send fewer chips per request, or the compact form (contract.encode_array)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None, (413, f"request body exceeds the limit of {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body.strip():
            return None, (400, 'empty request body; send a JSON object {"inputs": {modality: array}}')
        if not body.isascii():
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:  # (MLflow's error would quote the whole body)
                return None, (400, f"request body is not valid UTF-8 (byte {exc.start})")
        depth = json_depth(body)
        if depth > self.max_depth:
            return None, (400, f"JSON nested {depth} levels deep; a request nests at most {self.max_depth}")
        return body, None

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the inner app; rewrite its error answers; an exception becomes a short 500."""
        state: dict[str, Any] = {"start": None, "chunks": [], "sent": False, "complete": False}

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    state["sent"] = True
                    await send(message)
                else:
                    state["start"] = message
                return
            if message["type"] == "http.response.body" and state["start"] is not None:
                state["chunks"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    status = state["start"]["status"]
                    state["start"] = None
                    state["sent"] = state["complete"] = True
                    await _answer(send, status, body=b"".join(state["chunks"]))
                return
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            _log.exception("error while answering %s %s", scope.get("method"), scope.get("path"))
            if state["complete"]:
                return  # (Starlette answers 500, then re-raises): answered, the connection stays usable
            if state["sent"]:
                raise  # half an answer is out: nothing else can be said on this connection
            await _answer(send, 500, "internal error while answering the request (see the server log)")


async def _answer(send: Send, status: int, message: str | None = None, body: bytes = b"") -> None:
    content = error_body(status, body, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content, "more_body": False})


def _on_shutdown(receive: Receive, callback: Callable[[], None]) -> Receive:
    """A lifespan ``receive`` that calls ``callback`` when the server announces its shutdown."""

    async def watched() -> Message:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            callback()
        return message

    return watched


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out ``body`` once, then waits on the connection (for a disconnect)."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def default_max_body(config: Any = None, task: dict[str, Any] | None = None) -> int:
    """The default body limit: the model's largest valid request in the compact (base64 float32) form
    (:data:`mapex_core.contract.MAX_CHIPS` chips of every input band), and at least 32 MiB."""
    if config is None or task is None:
        return MIN_MAX_BODY
    from mapex_core.contract import MAX_CHIPS

    mods = task.get("input_modalities") or config.modalities
    values = MAX_CHIPS * sum(config.in_chans[m] for m in mods if m in config.in_chans) * config.img_size**2
    return max(MIN_MAX_BODY, math.ceil(values * 4 * 4 / 3) + (1 << 20))


def create_app(model_path: str | Path, max_body: int) -> GuardedApp:
    """Load the MLflow model in ``model_path`` (a local folder) and guard its scoring app."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(str(model_path))
    try:
        batcher = getattr(model.unwrap_python_model(), "batcher", None)
    except MlflowException:  # not a python_model: nothing batched here
        batcher = None
    said: list[bool] = []

    def say_shared() -> None:  # when the server stops: how much the requests shared their forward passes
        if batcher is not None and not said:
            said.append(True)
            print(f"mapex serve: {batcher.requests} requests ({batcher.rows} chips) in {batcher.batches} forward "
                  f"passes (process {os.getpid()})", file=sys.stderr, flush=True)

    # at lifespan shutdown: a worker of several dies of the SIGTERM uvicorn raises again, its exit handlers unrun
    app = GuardedApp(scoring_server.init(model), max_body, on_shutdown=say_shared)
    atexit.register(say_shared)
    # the model, torch, MLflow and FastAPI live as long as the server: out of the collector's full passes,
    # which walked them all while requests waited (~11% of a loaded server's CPU in perf: BENCHMARKS.md, Serving)
    gc.collect()
    gc.freeze()
    return app


def app_from_env() -> GuardedApp:
    """The app of a uvicorn worker process (``--workers`` > 1): the model and limit that
    :func:`serve_model` put in the environment.

    Raises:
        SystemExit: uvicorn's startup-failure status when the model does not load (the reason written to
            ``MAPEX_SERVE_FAILED``), so that uvicorn stops the server rather than restart the worker.
    """
    try:
        return create_app(os.environ[MODEL_ENV], int(os.environ[MAX_BODY_ENV]))
    except Exception as exc:
        from uvicorn.config import STARTUP_FAILURE

        traceback.print_exc()
        if os.environ.get(FAILED_ENV):
            Path(os.environ[FAILED_ENV]).write_text(f"{type(exc).__name__}: {short_message(str(exc))}")
        raise SystemExit(STARTUP_FAILURE) from None


def serve_workers(workers: int | None = None) -> int:
    """Worker processes of ``mapex serve``: ``workers``, or by default one per CPU core this process may
    use (:func:`mapex_core.runtime.cpu_count`; the choice is measured in BENCHMARKS.md, Serving).

    Raises:
        ValueError: ``workers`` is not a whole number >= 1 (named as ``--workers``).
    """
    if workers is None:
        return cpu_count()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a whole number of processes >= 1, got {workers!r}")
    return workers


def serve_model(model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int | None = None,
                max_body_mb: float | None = None, announce: Callable[[int], None] | None = None,
                max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
    """Serve the MLflow model ``model_uri`` (``models:/NAME/VERSION``) until SIGTERM or Ctrl-C.

    The model is downloaded into a temporary folder (removed when the server stops) and its MAPEX task
    model folder is checked (config bounds, tensor shapes) before anything is loaded.

    Args:
        workers: server worker processes (default :func:`serve_workers`: one per CPU core), each loading
            the model and batching its own requests; several share the cores (``OMP_NUM_THREADS`` of each:
            :func:`mapex_core.runtime.share_threads`, unless that variable is set).
        max_body_mb: the body limit in MiB; default :func:`default_max_body`.
        announce: called with the body limit in bytes once the model is checked, before the server starts.
        max_batch, max_wait_ms: adaptive batching of concurrent requests (rows per forward, 1: off; the
            longest wait for requests on their way, in ms); they set ``MAPEX_SERVE_MAX_BATCH`` and
            ``MAPEX_SERVE_MAX_WAIT_MS`` for the model (:mod:`mapex_core.tracking.batching`); ``None``
            leaves those variables, or the defaults.

    Raises:
        ValueError: a task model folder that does not match its config, or a bad ``workers``,
            ``max_body_mb``, ``max_batch`` or ``max_wait_ms`` (named).
        MapexError: a worker process (of several) could not load the model (its traceback is in the log).
    """
    import mlflow
    import uvicorn

    from mapex_core.model.heads import check_task_folder
    from mapex_core.tracking.batching import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_WAIT_MS,
        MAX_BATCH_ENV,
        MAX_WAIT_ENV,
        check_settings,
        settings_from_env,
    )

    workers = serve_workers(workers)
    if max_body_mb is not None and not (isinstance(max_body_mb, int | float) and 0 < max_body_mb <= 4096):
        raise ValueError(f"--max-body-mb must be a number in (0, 4096], got {max_body_mb!r}")
    if max_batch is not None:
        check_settings(max_batch, DEFAULT_MAX_WAIT_MS, "--max-batch")
        os.environ[MAX_BATCH_ENV] = str(int(max_batch))
    if max_wait_ms is not None:
        check_settings(DEFAULT_MAX_BATCH, max_wait_ms, "--max-wait-ms")
        os.environ[MAX_WAIT_ENV] = str(float(max_wait_ms))
    settings_from_env()  # the variables the model will read, checked before anything is downloaded
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it found: this
    # one ends the server normally (also while the model loads), so the temporary folder is always removed
    main = threading.current_thread() is threading.main_thread()  # signals can only be handled there
    previous = signal.signal(signal.SIGTERM, _stop) if main else None
    try:
        with tempfile.TemporaryDirectory(prefix="mapex-serve-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            task_dir = local / "artifacts" / "task_model"
            config = task = None
            if (task_dir / "task.json").is_file():
                config, task = check_task_folder(task_dir)
            max_body = int(max_body_mb * 2**20) if max_body_mb is not None else default_max_body(config, task)
            if announce is not None:
                announce(max_body)
            options: dict[str, Any] = {"host": host, "port": port, "loop": os.environ.get("UVICORN_LOOP", "auto"),
                                       "http": os.environ.get("UVICORN_HTTP", "auto")}
            if workers == 1:
                uvicorn.run(create_app(local, max_body), **options)
            else:  # each worker process (spawned: it reads these variables) loads the model itself
                failed = Path(tmp) / "worker-failed.txt"
                env = {MODEL_ENV: str(local), MAX_BODY_ENV: str(max_body), FAILED_ENV: str(failed)}
                if THREADS_ENV not in os.environ:  # each worker's share of the cores, not all of them each
                    env[THREADS_ENV] = str(share_threads(workers))
                with _environ(env):
                    uvicorn.run(f"{__name__}:app_from_env", factory=True, workers=workers, **options)
                if failed.is_file():  # (uvicorn stopped the other workers and returned)
                    raise MapexError(f"a server worker process could not load {model_uri}: {failed.read_text()} "
                                     "(its traceback is above)")
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (the worker processes started meanwhile inherit them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.update({k: v for k, v in before.items() if v is not None})
        for k in [k for k, v in before.items() if v is None]:
            os.environ.pop(k, None)


class _Stopped(Exception):
    """SIGTERM after uvicorn's graceful shutdown."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped
