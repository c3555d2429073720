"""The team dashboard: a static, self-contained site of the per-task models.

``write_dashboard`` collects the registry, stage reports and routing statistics of a project
(:mod:`~mapex_core.dashboard.collect`) and writes ``index.html`` (inline CSS and SVG charts, no
CDN: it opens offline from a file URL) and ``dashboard.json`` (the same data, for scripts).
``serve_dashboard`` serves the folder on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mapex_core.io import atomic_write_json, atomic_write_text

DEFAULT_OUT = Path("reports/dashboard")
DEFAULT_PORT = 8765


def write_dashboard(out: str | Path = DEFAULT_OUT, root: str | Path = ".",
                    params: str | Path = "params.yaml") -> dict[str, Any]:
    """Write the dashboard of the project in ``root`` to ``out``.

    Args:
        out: output folder (created); ``index.html`` and ``dashboard.json`` are replaced atomically,
            so a browser never sees half a page.
        root: the project folder (``params.yaml``, ``outputs/``, ``reports/``, ``mlflow/``).
        params: the params file, relative to ``root`` unless absolute.

    Returns:
        ``index`` (path of the page), ``apps``, ``versions`` (registered, all apps) and ``layers``
        (heatmaps drawn).

    Raises:
        ValueError: ``out`` exists and is not a folder, params or a report is unreadable.
    """
    from mapex_core.dashboard.collect import collect
    from mapex_core.dashboard.render import render

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    data = collect(root, params)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "dashboard.json", data)
    atomic_write_text(out / "index.html", render(data, out, root))
    routing = (data["pretrain"]["routing"] or {}).get("layers", {})
    return {"index": str(out / "index.html"), "apps": [a["name"] for a in data["apps"]],
            "versions": sum(len(a["versions"]) for a in data["apps"]), "layers": len(routing)}


def serve_dashboard(folder: str | Path = DEFAULT_OUT, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve ``folder`` over HTTP until interrupted (Ctrl-C). Binds 127.0.0.1 unless told otherwise.

    Raises:
        ValueError: ``folder`` has no ``index.html`` (write the dashboard first).
        OSError: the port is taken.
    """
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise ValueError(f"{folder}: no index.html (run `mapex dashboard --out {folder}` first)")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    with ThreadingHTTPServer((host, port), handler) as httpd:
        print(f"dashboard on http://{host}:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            httpd.serve_forever()
