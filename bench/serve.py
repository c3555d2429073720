"""REST serving latency and throughput of a registered application model, against in-process predict.

Needs a project whose registry holds the app (run ``make demo`` first). Starts ``mapex serve``
(a real ``mlflow models serve`` process, 1 worker), sends 1-chip requests of real test chips of the
app's chip store, and measures in the same run: p50/p99 latency of the served request (nested JSON
lists, and the compact base64 form) and of the in-process pyfunc ``predict`` on the same chip, then
throughput of base64 requests at concurrency 1 and 8 over ``--requests`` requests each (errors
counted). Prints a table, then one JSON line.

    python bench/serve.py [--app landcover-s2] [--requests 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except OSError:
        return 0


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

    port = _free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--app", args.app, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        for b in bodies:  # warm-up
            assert _post(url, b) == 200
        served, compact, local = [], [], []
        for i in range(args.latency_runs):  # alternate: the machine's noise hits all alike
            t = time.perf_counter()
            ok = _post(url, bodies[i % len(bodies)])
            served.append(time.perf_counter() - t)
            assert ok == 200
            t = time.perf_counter()
            ok = _post(url, packed[i % len(packed)])
            compact.append(time.perf_counter() - t)
            assert ok == 200
            t = time.perf_counter()
            model.predict(chips[i % len(chips)])
            local.append(time.perf_counter() - t)
        through = {}
        for conc in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                codes = list(pool.map(lambda i: _post(url, packed[i % len(packed)]), range(args.requests)))
            wall = time.perf_counter() - t
            through[conc] = {"req_per_s": round(args.requests / wall, 1), "errors": sum(c != 200 for c in codes)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    p = lambda xs, q: float(np.percentile(np.asarray(xs) * 1000, q))  # noqa: E731
    print(f"mapex-{args.app} v{version}, 1-chip requests, {args.latency_runs} alternating runs")
    print(f"served JSON p50 {p(served, 50):7.2f} ms  p99 {p(served, 99):7.2f} ms")
    print(f"served b64  p50 {p(compact, 50):7.2f} ms  p99 {p(compact, 99):7.2f} ms")
    print(f"in-process  p50 {p(local, 50):7.2f} ms  p99 {p(local, 99):7.2f} ms")
    for conc, r in through.items():
        print(f"concurrency {conc} (b64): {r['req_per_s']} requests/s, {r['errors']} errors in {args.requests}")
    print(json.dumps({"served_p50_ms": round(p(served, 50), 2), "served_p99_ms": round(p(served, 99), 2),
                      "served_b64_p50_ms": round(p(compact, 50), 2), "served_b64_p99_ms": round(p(compact, 99), 2),
                      "b64_p50_ratio": round(p(compact, 50) / p(local, 50), 2),
                      "inprocess_p50_ms": round(p(local, 50), 2), "inprocess_p99_ms": round(p(local, 99), 2),
                      "p50_ratio": round(p(served, 50) / p(local, 50), 2),
                      "throughput": through}))


if __name__ == "__main__":
    main()
