"""The team dashboard: a static, self-contained site of the per-task models.

``write_dashboard`` collects the registry, stage reports and routing statistics of a project
(:mod:`~mapex_core.dashboard.collect`) and writes ``index.html`` (inline CSS and SVG charts, no
CDN: it opens offline from a file URL) and ``dashboard.json`` (the same data, for scripts).
``serve_dashboard`` serves the folder on 127.0.0.1.

For a team (:mod:`~mapex_core.dashboard.publish`): ``publish_dashboard`` builds the same page from the
tracking server alone and logs it as a run of experiment ``mapex-dashboard``; ``serve_published``
serves the newest published page and follows newer ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mapex_core.dashboard.publish import (
    DASHBOARD_EXPERIMENT,
    DEFAULT_REFRESH_S,
    fetch_published,
    publish_dashboard,
    serve_published,
    server_configured,
)
from mapex_core.io import (
    atomic_write_json,
    atomic_write_text,
    check_output,
    folder_problem,
    merge_folder,
    replace_folder,
    staged_folder,
)

__all__ = ["DASHBOARD_EXPERIMENT", "DEFAULT_OUT", "DEFAULT_PORT", "DEFAULT_REFRESH_S", "fetch_published",
           "publish_dashboard", "serve_dashboard", "serve_published", "server_configured", "write_dashboard"]

DEFAULT_OUT = Path("reports/dashboard")
DEFAULT_PORT = 8765
FILES = ("dashboard.json", "index.html")  # what the dashboard folder holds (index.html is written last)


def write_dashboard(out: str | Path = DEFAULT_OUT, root: str | Path = ".",
                    params: str | Path = "params.yaml", force: bool = False) -> dict[str, Any]:
    """Write the dashboard of the project in ``root`` to ``out``.

    Args:
        out: output folder; built aside and swapped into place whole, so a browser never sees half
            a page or a page with another run's data.
        root: the project folder (``params.yaml``, ``outputs/``, ``reports/``, ``mlflow/``).
        params: the params file, relative to ``root`` unless absolute.
        force: write into an ``out`` that holds other files (they are kept; ``index.html`` is
            removed first and written last), or replace a file there.

    Returns:
        ``index`` (path of the page), ``apps``, ``versions`` (registered, all apps) and ``layers``
        (heatmaps drawn).

    Raises:
        OutputConflict: ``out`` is a file or a folder holding other files, and ``force`` is not given.
        ValueError: params or a report is unreadable.
    """
    from mapex_core.dashboard.collect import collect
    from mapex_core.dashboard.render import render

    out = Path(out)

    def problem(path: Path) -> str | None:
        return "exists and is not a folder" if not path.is_dir() else folder_problem(path, "a dashboard", FILES)

    check_output(out, problem, force, hint="pass --force to write into it (its other files are kept)")
    data = collect(root, params)
    with staged_folder(out) as tmp:
        atomic_write_json(tmp / "dashboard.json", data)
        atomic_write_text(tmp / "index.html", render(data, out, root))
        if check_output(out, problem, force) and out.is_dir():  # again: something may have appeared meanwhile
            merge_folder(tmp, out, marker="index.html")
        else:
            replace_folder(tmp, out)
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
