"""REST serving latency and throughput of a registered application model, against the in-process model.

Needs a project whose registry holds the app (run ``make demo`` first). Starts ``mapex serve``
(a real ``mlflow models serve`` process, 1 worker) twice: as shipped (uvicorn on uvloop +
httptools) and on uvicorn's pure-Python stack (asyncio + h11). Sends 1-chip requests of real test
chips of the app's chip store over keep-alive connections and measures in the same run, in
alternating blocks: p50/p99 latency of the served request (nested JSON lists, and the compact
base64 form on both servers, on a kept-alive and on a new connection), of the in-process pyfunc ``predict`` and of the bare in-process
forward of the same task model; then throughput of base64 requests at concurrency 1 and 8 over
``--requests`` requests each (errors counted). Prints a table, then one JSON line.

    python bench/serve.py [--app landcover-s2] [--requests 1000] [--latency-runs 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 25  # calls of one kind in a row (see the latency loop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_local = threading.local()


def _send(conn: http.client.HTTPConnection, path: str, body: bytes) -> int:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def _post(url: str, body: bytes) -> int:
    """POST ``body`` as JSON on this thread's keep-alive connection to that server (as a client session
    would); the status."""
    parts = urlsplit(url)
    conns = _local.__dict__.setdefault("conns", {})
    key = (parts.hostname, parts.port)  # one connection per server: the bench talks to two
    for attempt in range(2):
        conn = conns.get(key) or conns.setdefault(key, http.client.HTTPConnection(*key, timeout=60))
        try:
            return _send(conn, parts.path, body)
        except OSError:
            conn.close()
            conns.pop(key, None)
            if attempt:
                return 0
    return 0


def _post_fresh(url: str, body: bytes) -> int:
    """POST on a new connection, closed after the response (a client without keep-alive, e.g. curl)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        return _send(conn, parts.path, body)
    except OSError:
        return 0
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", default="landcover-s2")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=200)
    args = ap.parse_args()
    os.chdir(ROOT)
    import mlflow

    from mapex_core import tracking
    from mapex_core.apps import get_application
    from mapex_core.data.chips import ChipStore, collate

    tracking.configure()
    version = tracking.model_version_for(args.app, "champion")
    app = get_application(args.app, "params.yaml")
    model = mlflow.pyfunc.load_model(f"models:/mapex-{args.app}@champion")
    raw = ChipStore.open(app.chips, modalities=app.modalities, split="test", normalize=False)
    chips = [{m: collate([raw[i]])[m].numpy() for m in app.modalities} for i in range(min(8, len(raw)))]
    import base64

    bodies = [json.dumps({"inputs": {m: a.tolist() for m, a in c.items()}}).encode() for c in chips]
    packed = [json.dumps({"inputs": {m: {"b64": base64.b64encode(a.astype("<f4").tobytes()).decode(),
                                         "shape": list(a.shape)} for m, a in c.items()}}).encode() for c in chips]

    # the server as shipped (uvicorn picks uvloop + httptools), and the same server on uvicorn's pure-Python
    # stack (asyncio + h11, what it ran on before those two were installed), measured side by side
    servers = {"shipped": {}, "asyncio+h11": {"UVICORN_LOOP": "asyncio", "UVICORN_HTTP": "h11"}}
    procs, urls = [], {}
    try:
        for name, extra in servers.items():
            port = _free_port()
            urls[name] = f"http://127.0.0.1:{port}/invocations"
            procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--app", args.app, "--port",
                                           str(port)], env=dict(os.environ, **extra), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for name in servers:
            for _ in range(240):
                try:
                    with urllib.request.urlopen(urls[name].replace("/invocations", "/ping"), timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
        url, plain_url = urls["shipped"], urls["asyncio+h11"]
        for b in bodies + packed:  # warm-up
            assert _post(url, b) == 200 and _post(plain_url, b) == 200
        # the in-process baselines: the pyfunc's predict (contract checks + normalisation + forward) and the
        # bare forward of the same task model on the already-normalised chip
        import torch

        inner = model.unwrap_python_model()
        normed = [{m: torch.from_numpy(a) for m, a in inner.contract.normalize(inner.contract.validate(c)).items()}
                  for c in chips]

        def forward(x: dict) -> None:
            with torch.inference_mode():
                inner.model(x)

        # Alternate in blocks of BLOCK calls of each kind: the machine's drift hits all alike, while a
        # process's idle OpenMP threads (which spin for a while after a forward) only disturb the
        # first call of the next block, not every call of the other kind.
        served, compact, plain, fresh, fresh_plain, local, bare = [], [], [], [], [], [], []
        calls = [(served, lambda i: _post(url, bodies[i % len(bodies)]) == 200),
                 (compact, lambda i: _post(url, packed[i % len(packed)]) == 200),
                 (plain, lambda i: _post(plain_url, packed[i % len(packed)]) == 200),
                 (fresh, lambda i: _post_fresh(url, packed[i % len(packed)]) == 200),
                 (fresh_plain, lambda i: _post_fresh(plain_url, packed[i % len(packed)]) == 200),
                 (local, lambda i: model.predict(chips[i % len(chips)]) is not None),
                 (bare, lambda i: forward(normed[i % len(normed)]) is None)]
        for start in range(0, args.latency_runs, BLOCK):
            for times, call in calls:
                for i in range(start, min(start + BLOCK, args.latency_runs)):
                    t = time.perf_counter()
                    ok = call(i)
                    times.append(time.perf_counter() - t)
                    assert ok
        through = {}
        for conc in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                codes = list(pool.map(lambda i: _post(url, packed[i % len(packed)]), range(args.requests)))
            wall = time.perf_counter() - t
            through[conc] = {"req_per_s": round(args.requests / wall, 1), "errors": sum(c != 200 for c in codes)}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    p = lambda xs, q: float(np.percentile(np.asarray(xs) * 1000, q))  # noqa: E731
    print(f"mapex-{args.app} v{version}, 1-chip requests, {args.latency_runs} runs each, alternating in blocks of {BLOCK}")
    print(f"served JSON p50 {p(served, 50):7.2f} ms  p99 {p(served, 99):7.2f} ms")
    print(f"served b64  p50 {p(compact, 50):7.2f} ms  p99 {p(compact, 99):7.2f} ms")
    print(f"served b64 on asyncio+h11  p50 {p(plain, 50):7.2f} ms  p99 {p(plain, 99):7.2f} ms "
          f"(shipped / this: {p(compact, 50) / p(plain, 50):.2f})")
    print(f"served b64, a new connection per request: shipped p50 {p(fresh, 50):7.2f} ms, asyncio+h11 p50 "
          f"{p(fresh_plain, 50):7.2f} ms (shipped / asyncio+h11: {p(fresh, 50) / p(fresh_plain, 50):.2f})")
    print(f"in-process pyfunc predict  p50 {p(local, 50):7.2f} ms  p99 {p(local, 99):7.2f} ms")
    print(f"in-process forward         p50 {p(bare, 50):7.2f} ms  p99 {p(bare, 99):7.2f} ms")
    print(f"p50 served b64 / forward: {p(compact, 50) / p(bare, 50):.2f}   / pyfunc predict: "
          f"{p(compact, 50) / p(local, 50):.2f}")
    for conc, r in through.items():
        print(f"concurrency {conc} (b64): {r['req_per_s']} requests/s, {r['errors']} errors in {args.requests}")
    print(json.dumps({"served_p50_ms": round(p(served, 50), 2), "served_p99_ms": round(p(served, 99), 2),
                      "served_b64_p50_ms": round(p(compact, 50), 2), "served_b64_p99_ms": round(p(compact, 99), 2),
                      "b64_p50_ratio": round(p(compact, 50) / p(local, 50), 2),
                      "inprocess_p50_ms": round(p(local, 50), 2), "inprocess_p99_ms": round(p(local, 99), 2),
                      "asyncio_h11_b64_p50_ms": round(p(plain, 50), 2),
                      "new_connection_b64_p50_ms": round(p(fresh, 50), 2),
                      "new_connection_asyncio_h11_b64_p50_ms": round(p(fresh_plain, 50), 2),
                      "forward_p50_ms": round(p(bare, 50), 2), "forward_p99_ms": round(p(bare, 99), 2),
                      "b64_p50_ratio_vs_forward": round(p(compact, 50) / p(bare, 50), 2),
                      "p50_ratio": round(p(served, 50) / p(local, 50), 2),
                      "throughput": through}))


if __name__ == "__main__":
    main()
