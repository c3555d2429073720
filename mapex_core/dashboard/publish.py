"""The team's dashboard on the tracking server: published with each retrain, served to the team from there.

* :func:`publish_dashboard` builds the page from the tracking server alone
  (:func:`~mapex_core.dashboard.collect.collect_server`) and logs ``index.html`` + ``dashboard.json``
  as the artifacts of a run of experiment ``mapex-dashboard`` tagged ``mapex.dashboard=published``.
* :func:`serve_published` serves the newest such run over HTTP and checks every ``refresh_s``
  seconds for a newer one (a retrain on any machine publishes; the page follows without a
  restart). ``/health`` answers ``OK``; until anything is published ``/`` says so.

Both go through :mod:`mapex_core.tracking` (the MLflow door), so the page travels through the
tracking server's proxied artifacts: the machine that serves it needs no shared folder.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
from html import escape
from pathlib import Path
from typing import Any

DASHBOARD_EXPERIMENT = "mapex-dashboard"
PUBLISHED_TAG = {"mapex.dashboard": "published"}
FILES = ("index.html", "dashboard.json")
DEFAULT_REFRESH_S = 15.0


def server_configured() -> bool:
    """Whether the tracking store is a tracking server (``MLFLOW_TRACKING_URI`` http(s)), not a local file."""
    from mapex_core import tracking

    return tracking.tracking_uri().startswith(("http://", "https://"))


def publish_dashboard(params: str | Path | None = None, root: str | Path = ".") -> dict[str, Any]:
    """Build the dashboard from the tracking store alone and log it as a run of ``mapex-dashboard``.

    Args:
        params: a params file: its ``pipeline.apps`` come first on the page (optional: without it every
            registered application is listed).
        root: the folder whose sqlite store is used when no tracking server is configured.

    Returns:
        ``run_id``, ``experiment``, ``artifact_uri``, ``tracking_uri``, ``apps``, ``versions`` and ``layers``.

    Raises:
        mapex_core.tracking.TrackingError: the tracking store does not answer or refused the run.
        ValueError: ``params`` is unreadable, or a logged report is corrupt (names the run).
    """
    from mapex_core import tracking
    from mapex_core.dashboard.collect import collect_server, redact
    from mapex_core.dashboard.render import render

    uri = tracking.configure(root=root)
    data = collect_server(params, uri)
    files = {"dashboard.json": json.dumps(data, indent=2, default=str),
             "index.html": render(data, Path(root), Path(root))}  # index.html last: a reader never sees it alone
    names = [a["name"] for a in data["apps"]]
    tags = PUBLISHED_TAG | {"mapex.dashboard.apps": ",".join(names)[:5000], "mapex.git_sha": data["git_sha"],
                            "mapex.dashboard.generated": data["generated"]}
    run = tracking.log_files_run(files, DASHBOARD_EXPERIMENT, "dashboard", tags)
    routing = (data["pretrain"]["routing"] or {}).get("layers", {})
    return {"run_id": run["run_id"], "experiment": DASHBOARD_EXPERIMENT, "artifact_uri": run["artifact_uri"],
            "tracking_uri": redact(uri), "apps": names, "versions": sum(len(a["versions"]) for a in data["apps"]),
            "layers": len(routing)}


def latest_published() -> dict[str, Any] | None:
    """The newest published dashboard run (``run_id``, ``start_time``, ``tags``), or ``None``."""
    from mapex_core import tracking

    return tracking.latest_run(PUBLISHED_TAG, experiment=DASHBOARD_EXPERIMENT)


def fetch_published(dst: str | Path) -> dict[str, Any] | None:
    """Download the newest published dashboard into ``dst`` (``index.html``, ``dashboard.json``).

    Returns:
        The run (:func:`latest_published`) with ``folder``, or ``None`` when nothing is published yet.

    Raises:
        mapex_core.tracking.TrackingError: the tracking store does not answer or lost the files.
    """
    from mapex_core import tracking

    run = latest_published()
    if run is None:
        return None
    return run | {"folder": str(tracking.download_run_files(run["run_id"], list(FILES), dst))}


def _placeholder(uri: str) -> bytes:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>MAPEX dashboard</title></head>"
            f"<body><h1>MAPEX dashboard</h1><p>No dashboard published to <code>{escape(uri)}</code> yet: the next "
            "retrain publishes one (or run <code>mapex dashboard --publish</code>). This page follows the newest "
            "without a restart.</p></body></html>").encode()


class _Page:
    """The files being served and the run they came from; replaced whole when a newer run is published."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.files: dict[str, bytes] = {"index.html": _placeholder(uri)}
        self.problem: str | None = None

    def refresh(self) -> bool:
        """Load the newest published run when it is not the one served; whether the page changed."""
        run = latest_published()
        if run is None or run["run_id"] == self.run_id:
            return False
        with tempfile.TemporaryDirectory() as tmp:
            from mapex_core import tracking

            folder = tracking.download_run_files(run["run_id"], list(FILES), tmp)
            files = {name: (folder / name).read_bytes() for name in FILES}
        with self.lock:
            self.run_id, self.files = run["run_id"], files
        return True

    def get(self, name: str) -> tuple[bytes | None, str | None]:
        with self.lock:
            return self.files.get(name), self.run_id


def serve_published(host: str = "127.0.0.1", port: int = 8765, refresh_s: float = DEFAULT_REFRESH_S,
                    root: str | Path = ".") -> None:
    """Serve the newest dashboard published to the tracking store until interrupted (Ctrl-C).

    Checks every ``refresh_s`` seconds for a newer published run; a check that fails (the server
    restarting) is reported on stderr and the page served so far stays. Binds 127.0.0.1 unless told
    otherwise. Responses carry ``X-MAPEX-Dashboard-Run`` (the MLflow run of the page).

    Raises:
        mapex_core.tracking.TrackingError: the tracking store does not answer at start.
        OSError: the port is taken.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mapex_core import tracking
    from mapex_core.dashboard.collect import redact
    from mapex_core.errors import MapexError

    page = _Page(redact(tracking.configure(root=root)))
    page.refresh()
    types = {"index.html": "text/html; charset=utf-8", "dashboard.json": "application/json"}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: bytes | None, kind: str, run: str | None) -> None:
            if body is None:
                self.send_error(404, "not published")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            if run:
                self.send_header("X-MAPEX-Dashboard-Run", run)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0].lstrip("/") or "index.html"
            if path == "health":
                self._send(b"OK", "text/plain", None)
            elif path in types:
                body, run = page.get(path)
                self._send(body, types[path], run)
            else:
                self.send_error(404, "only /, /index.html, /dashboard.json and /health are served")

        do_HEAD = do_GET  # noqa: N815 - the stdlib's name

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(refresh_s):
            try:
                if page.refresh():
                    print(f"dashboard: now serving MLflow run {page.run_id}", flush=True)
                problem = None
            except (MapexError, OSError, ValueError) as exc:  # keep serving the page we have
                problem = str(exc)
            if problem != page.problem and problem:
                print(f"dashboard: cannot check for a newer page ({problem}); still serving run {page.run_id}",
                      file=sys.stderr, flush=True)
            page.problem = problem

    with ThreadingHTTPServer((host, port), Handler) as httpd:
        watcher = threading.Thread(target=watch, name="dashboard-refresh", daemon=True)
        watcher.start()
        shown = f"run {page.run_id}" if page.run_id else "nothing published yet"
        print(f"dashboard on http://{host}:{httpd.server_address[1]}/ (newest published to {page.uri}: {shown}; "
              f"checked every {refresh_s:g} s; Ctrl-C stops)", flush=True)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                httpd.serve_forever()
        finally:
            stop.set()
            watcher.join(timeout=5)
