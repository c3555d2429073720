"""REST serving latency and throughput of a registered application model, against the in-process model.

Needs a project whose registry holds the app (run ``make demo`` first). Starts ``mapex serve``
(a real server process, 1 worker: MLflow's scoring app behind MAPEX's request guard) twice: as shipped (uvicorn on uvloop +
httptools) and on uvicorn's pure-Python stack (asyncio + h11). Sends 1-chip requests of real test
chips of the app's chip store and measures in the same run, in alternating blocks, the p50/p99
latency of:

* the served request: nested JSON lists; the base64 form in float32; the base64 form in the
  smallest exact dtype (``contract.encode_array``: int16 for integer Sentinel-2 digital numbers;
  float32 for these chips, whose resampled 20/60 m bands are not integers), on a
  kept-alive connection to both servers and on a new connection per request;
* the in-process pyfunc ``predict`` and the bare in-process forward of the same task model, back
  to back; and the same forward after a pause of ``PAUSE_MS`` (what a server sees between requests:
  cold caches and sleeping OpenMP threads).

The floor: the same request to the same server stack serving a model that returns at once (its
process imports torch and MAPEX and sets the serving malloc threshold, as the real one does):
what the server stack costs on its own for this body, whatever the model.

Then the throughput of compact requests at concurrency 1 and 8 over ``--requests`` requests each
(errors counted). Prints a table, then one JSON line.

``--dim/--depth/--heads`` serve the app's model at another width and depth instead (e.g. a
ViT-S: 384/12/6): a randomly initialised task model with the champion's modalities, classes,
normalisation and pruned expert layout, registered as ``mapex-APP@champion`` in a scratch MLflow
store under a temporary folder. Latency does not depend on the weights' values.

    python bench/serve.py [--app landcover-s2] [--requests 1000] [--latency-runs 200] [--dim 384 --depth 12 --heads 6]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
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
PAUSE_MS = 5.0  # before each 'cold' in-process forward


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


FLOOR_MODEL = '''"""bench/serve.py's floor: a MAPEX serving process (imports, malloc threshold) that does no work."""
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class Floor(PythonModel):
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch  # noqa: F401
        import mapex_core.model  # noqa: F401
        from mapex_core._env import SERVING_MMAP_THRESHOLD, return_freed_memory

        return_freed_memory(SERVING_MMAP_THRESHOLD)

    def predict(self, context, model_input, params=None):
        return {"probabilities": [[1.0]], "classes": ["floor"]}


set_model(Floor())
'''


def floor_store(tmp: Path) -> str:
    """Register :data:`FLOOR_MODEL` as ``mapex-bench-floor@champion`` in a scratch store; its URI.
    Leaves this process's tracking URI as it was."""
    import mlflow

    from mapex_core.tracking.served import signature

    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp / 'floor.db'}"
    code = tmp / "floor_model.py"
    code.write_text(FLOOR_MODEL)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)  # registered there too, never in the project's registry
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.create_experiment("bench-serve-floor", artifact_location=(tmp / "floor-artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=[],
                                           registered_model_name="mapex-bench-floor", signature=signature())
        client.set_registered_model_alias("mapex-bench-floor", "champion", str(info.registered_model_version))
    finally:
        mlflow.set_tracking_uri(prev[0])
        mlflow.set_registry_uri(prev[1])
    return uri


def scaled_store(app_name: str, dim: int, depth: int, heads: int, tmp: Path) -> str:
    """Register a randomly initialised ``mapex-APP`` of the given size in a scratch store; its URI."""
    import mlflow
    import torch

    from mapex_core import tracking
    from mapex_core.model import MapexModel
    from mapex_core.model.config import MapexConfig
    from mapex_core.model.heads import TaskModel, load_task_model, save_task_model
    from mapex_core.tracking.store import log_model_version

    champion = load_task_model(tracking.download_task_model(app_name, "champion", tmp / "champion"))
    data = champion.encoder.config.to_dict()
    kept = data.get("kept_experts")
    data.update(dim=dim, depth=depth, heads=heads)
    if kept:  # the champion's kept experts per MoE block, cycled over the new depth's MoE blocks
        n_moe = len(MapexConfig.from_dict(dict(data, kept_experts=None)).moe_layers)
        data["kept_experts"] = [kept[j % len(kept)] for j in range(n_moe)]  # the champion's layers, cycled
    torch.manual_seed(0)
    model = TaskModel(MapexModel(MapexConfig.from_dict(data), with_decoder=False), champion.task,
                      champion.class_names, {"app": app_name, "bench": "serve.py scaled"}, champion.head_channels,
                      champion.input_modalities)
    d = save_task_model(model, tmp / "scaled")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.configure(uri)
    client = mlflow.MlflowClient()
    exp = client.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        ver = log_model_version("task_model", d, ("config.json", "task.json", "model.safetensors"),
                                tracking.registered_name(app_name), metadata={"mapex_contract": tracking.task_contract(d)})
    client.set_registered_model_alias(tracking.registered_name(app_name), "champion", ver)
    print(f"scaled model: dim {dim}, depth {depth}, heads {heads}: {model.num_parameters() / 1e6:.2f} M parameters",
          flush=True)
    return uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", default="landcover-s2")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--dim", type=int, help="serve a model of this width (with --depth and --heads) instead")
    ap.add_argument("--depth", type=int)
    ap.add_argument("--heads", type=int)
    args = ap.parse_args()
    scaled = (args.dim, args.depth, args.heads)
    if any(scaled) and not all(scaled):
        ap.error("--dim, --depth and --heads go together")
    os.chdir(ROOT)
    import base64
    import tempfile

    import mlflow

    from mapex_core import tracking
    from mapex_core.apps import get_application
    from mapex_core.contract import encode_array
    from mapex_core.data.chips import ChipStore, collate

    tracking.configure()
    app = get_application(args.app, "params.yaml")
    raw = ChipStore.open(app.chips, modalities=app.modalities, split="test", normalize=False)
    chips = [{m: collate([raw[i]])[m].numpy() for m in app.modalities} for i in range(min(8, len(raw)))]
    tmp = Path(tempfile.mkdtemp(prefix="mapex-bench-serve-"))
    env = dict(os.environ)
    try:
        if all(scaled):
            env["MLFLOW_TRACKING_URI"] = scaled_store(args.app, *scaled, tmp)
        version = tracking.model_version_for(args.app, "champion")
        model = mlflow.pyfunc.load_model(f"models:/mapex-{args.app}@champion")
        floor_uri = floor_store(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    bodies = [json.dumps({"inputs": {m: a.tolist() for m, a in c.items()}}).encode() for c in chips]
    packed = [json.dumps({"inputs": {m: {"b64": base64.b64encode(a.astype("<f4").tobytes()).decode(),
                                         "shape": list(a.shape)} for m, a in c.items()}}).encode() for c in chips]
    compact = [json.dumps({"inputs": {m: encode_array(a) for m, a in c.items()}}).encode() for c in chips]
    dtypes = {m: encode_array(a)["dtype"] for m, a in chips[0].items()}

    # the server as shipped (uvicorn picks uvloop + httptools), and the same server on uvicorn's pure-Python
    # stack (asyncio + h11, what it ran on before those two were installed), measured side by side
    # and the floor: a model that returns at once, on the shipped stack
    servers = {"shipped": (args.app, {}), "asyncio+h11": (args.app, {"UVICORN_LOOP": "asyncio", "UVICORN_HTTP": "h11"}),
               "floor": ("bench-floor", {"MLFLOW_TRACKING_URI": floor_uri})}
    procs, urls = [], {}
    try:
        for name, (served_app, extra) in servers.items():
            port = _free_port()
            urls[name] = f"http://127.0.0.1:{port}/invocations"
            procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--app", served_app, "--port",
                                           str(port)], env=dict(env, **extra), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for name in servers:
            for _ in range(240):
                try:
                    with urllib.request.urlopen(urls[name].replace("/invocations", "/ping"), timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
        url, plain_url, floor_url = urls["shipped"], urls["asyncio+h11"], urls["floor"]
        for b in bodies + packed + compact:  # warm-up
            assert _post(url, b) == 200 and _post(plain_url, b) == 200 and _post(floor_url, b) == 200
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
        kinds = {k: [] for k in ("json", "b64", "compact", "compact_h11", "fresh", "fresh_h11", "floor", "pyfunc",
                                 "forward", "forward_cold")}
        calls = {"json": lambda i: _post(url, bodies[i % len(bodies)]) == 200,
                 "b64": lambda i: _post(url, packed[i % len(packed)]) == 200,
                 "compact": lambda i: _post(url, compact[i % len(compact)]) == 200,
                 "compact_h11": lambda i: _post(plain_url, compact[i % len(compact)]) == 200,
                 "fresh": lambda i: _post_fresh(url, compact[i % len(compact)]) == 200,
                 "fresh_h11": lambda i: _post_fresh(plain_url, compact[i % len(compact)]) == 200,
                 "floor": lambda i: _post(floor_url, compact[i % len(compact)]) == 200,
                 "pyfunc": lambda i: model.predict(chips[i % len(chips)]) is not None,
                 "forward": lambda i: forward(normed[i % len(normed)]) is None,
                 "forward_cold": lambda i: forward(normed[i % len(normed)]) is None}
        for start in range(0, args.latency_runs, BLOCK):
            for kind, call in calls.items():
                for i in range(start, min(start + BLOCK, args.latency_runs)):
                    if kind == "forward_cold":
                        time.sleep(PAUSE_MS / 1000)
                    t = time.perf_counter()
                    ok = call(i)
                    kinds[kind].append(time.perf_counter() - t)
                    assert ok
        through = {}
        for conc in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                codes = list(pool.map(lambda i: _post(url, compact[i % len(compact)]), range(args.requests)))
            wall = time.perf_counter() - t
            through[conc] = {"req_per_s": round(args.requests / wall, 1), "errors": sum(c != 200 for c in codes)}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    p50 = {k: float(np.percentile(np.asarray(v) * 1000, 50)) for k, v in kinds.items()}
    p99 = {k: float(np.percentile(np.asarray(v) * 1000, 99)) for k, v in kinds.items()}
    params = inner.model.num_parameters()
    print(f"mapex-{args.app} v{version} ({params / 1e6:.2f} M parameters), 1-chip requests, {args.latency_runs} "
          f"runs each, alternating in blocks of {BLOCK}; compact dtypes {dtypes}")
    sizes = {"json": len(bodies[0]), "b64": len(packed[0]), "compact": len(compact[0])}
    labels = {"json": "served, nested JSON lists", "b64": "served, base64 float32",
              "compact": "served, base64 compact", "compact_h11": "  same on asyncio + h11",
              "fresh": "served, compact, new connection", "fresh_h11": "  same on asyncio + h11",
              "floor": "floor: a model that returns at once",
              "pyfunc": "in-process pyfunc predict", "forward": "in-process forward",
              "forward_cold": f"in-process forward after {PAUSE_MS:g} ms"}
    for k, label in labels.items():
        size = f"  ({sizes[k] / 1000:.0f} kB body)" if k in sizes else "  (compact body)" if k == "floor" else ""
        print(f"{label:34s} p50 {p50[k]:7.2f} ms  p99 {p99[k]:7.2f} ms{size}")
    print(f"p50 served compact / forward: {p50['compact'] / p50['forward']:.2f}   / forward after a pause: "
          f"{p50['compact'] / p50['forward_cold']:.2f}   / pyfunc predict: {p50['compact'] / p50['pyfunc']:.2f}")
    print(f"server floor: {p50['floor']:.2f} ms = {p50['floor'] / p50['forward']:.2f} x the forward (a 1.5x target leaves "
          f"{0.5 * p50['forward']:.2f} ms for everything that is not the forward)")
    print(f"uvloop+httptools / asyncio+h11 p50: kept-alive {p50['compact'] / p50['compact_h11']:.2f}, "
          f"new connection {p50['fresh'] / p50['fresh_h11']:.2f}")
    for conc, r in through.items():
        print(f"concurrency {conc} (compact): {r['req_per_s']} requests/s, {r['errors']} errors in {args.requests}")
    print(json.dumps({"app": args.app, "version": version, "params": params, "scaled": all(scaled),
                      "compact_dtypes": dtypes, "body_bytes": sizes,
                      "p50_ms": {k: round(v, 2) for k, v in p50.items()},
                      "p99_ms": {k: round(v, 2) for k, v in p99.items()},
                      "p50_ratio_vs_forward": round(p50["compact"] / p50["forward"], 2),
                      "p50_ratio_vs_cold_forward": round(p50["compact"] / p50["forward_cold"], 2),
                      "p50_ratio_vs_pyfunc": round(p50["compact"] / p50["pyfunc"], 2),
                      "floor_vs_forward": round(p50["floor"] / p50["forward"], 2),
                      "throughput": through}))


if __name__ == "__main__":
    main()
