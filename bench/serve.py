"""REST serving of a registered application model: latency against the in-process model, and throughput as
clients are added, with and without adaptive batching, on one server worker and on the default (one per core).

Needs a project whose registry holds the app (``make demo``; ``--project`` points at it, default this
checkout). Starts real ``mapex serve`` processes (MLflow's scoring app behind MAPEX's request guard, this
checkout's code, 127.0.0.1), all alive at once and measured in alternating blocks:

* ``batched, 1 worker``: ``--workers 1`` (one process; concurrent requests share forward passes,
  :mod:`mapex_core.tracking.batching`): what shipped before the default became one worker per core;
* ``unbatched``: the same with ``--max-batch 1`` (each request its own forward in its own thread:
  what it was before batching);
* ``default, N workers``: as shipped, no ``--workers``: one process per CPU core of this machine, each
  batching (N = 2 on a 2-core machine: the server measured as ``2 workers`` before it became the default);
* ``floor``: a server of one worker serving a model that returns at once (its process imports torch and
  MAPEX and sets the serving malloc threshold, as the real one does): what the server stack costs
  on its own for this body, whatever the model.

``MAPEX_SERVE_BATCH_THREADS`` (several intra-op threads for a forward of several rows) is no longer
measured here: on 2 cores it lost on a loaded and on a quiet machine alike (BENCHMARKS.md, Serving).

Requests are 1-chip real test chips of the app's chip store in the compact form
(``contract.encode_array``), each client thread on its own kept-alive connection.

Latency (one client, alternating blocks of ``BLOCK`` calls): p50/p99 of the served request (batched on
one worker, unbatched, the default), the floor, the in-process pyfunc ``predict``, the bare in-process
forward back to back with torch's threads, the same after a pause of ``PAUSE_MS``, and with the serving forward
thread's intra-op threads (``batching.forward_threads``: one fewer); then ``(served p50 - floor p50)
/ forward p50``, over the faster of the two forwards (the stricter figure).

Throughput: ``--requests`` requests per server and concurrency (1, 8, 32), sent in ``--rounds``
alternating blocks; requests/s, p50/p99 latency, the server's CPU time and context switches per
request (all its processes and threads: figures the machine's other load disturbs less than the
wall clock), errors. Then 1000
requests at concurrency 32 to the shipped default server, counting 5xx answers and connection errors apart.
Prints a table, then one JSON line.

``--dim/--depth/--heads`` serve the app's model at another width and depth instead (e.g. the
``MapexConfig`` defaults 192/6/3, or a ViT-S: 384/12/6): a randomly initialised task model with the
champion's modalities, classes, normalisation and pruned expert layout, registered as
``mapex-APP@champion`` in a scratch MLflow store under a temporary folder. Latency does not depend on
the weights' values.

    python bench/serve.py [--project DIR] [--app landcover-s2] [--requests 1000] [--rounds 4]
                          [--latency-runs 200] [--dim 192 --depth 6 --heads 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mapex_core, also with --project elsewhere
BLOCK = 25  # calls of one kind in a row (see the latency loop)
PAUSE_MS = 5.0  # before each 'cold' in-process forward
CONCURRENCY = (1, 8, 32)
C32_REQUESTS = 1000
SERVER = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from mapex_core.cli import main; main()"

_local = threading.local()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> int:
    """POST ``body`` to ``/invocations`` on this thread's kept-alive connection to ``port``; the status,
    or 0 for a connection error. A kept-alive connection that the server closed while idle (uvicorn's
    keep-alive timeout, 5 s) is retried once on a new one, as HTTP clients do (counted in ``RECONNECTS``);
    an error on a new connection is a connection error."""
    conns = _local.__dict__.setdefault("conns", {})
    for fresh in (port not in conns, True):
        conn = conns.get(port) or conns.setdefault(port, http.client.HTTPConnection("127.0.0.1", port, timeout=120))
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.will_close:
                conns.pop(port).close()
            return r.status
        except OSError:
            conns.pop(port, None)
            conn.close()
            if fresh:
                return 0
            RECONNECTS.append(port)
    return 0


RECONNECTS: list[int] = []


def _usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and context switches (voluntary and not, over all threads) of process
    ``pid`` and its live children (uvicorn's worker processes)."""
    cpu, switches = 0.0, 0
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [pid, *map(int, kids)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in tasks:
            try:
                lines = (task / "status").read_text().splitlines()
            except OSError:
                continue
            switches += sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return cpu, switches


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


def start_servers(servers: dict[str, tuple[str, list[str], dict[str, str]]], env: dict[str, str],
                  logs: Path) -> tuple[dict[str, subprocess.Popen], dict[str, int]]:
    """Start every ``mapex serve`` at once (name -> app, extra arguments, extra environment); wait for /ping."""
    procs, ports = {}, {}
    for name, (app, args, extra) in servers.items():
        ports[name] = _free_port()
        with open(logs / f"{name.replace(' ', '_')}.log", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-c", SERVER, "serve", "--app", app, "--port",
                                            str(ports[name]), *args], env=dict(env, **extra),
                                           stdout=subprocess.DEVNULL, stderr=err)
    for name in servers:
        for _ in range(480):
            if procs[name].poll() is not None:
                raise RuntimeError(f"server {name!r} exited: {(logs / (name.replace(' ', '_') + '.log')).read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
    return procs, ports


def throughput(ports: dict[str, int], pids: dict[str, int], bodies: list[bytes], requests: int, rounds: int
               ) -> dict[str, dict[int, dict[str, float]]]:
    """Per server and concurrency: requests/s, p50/p99 latency, server CPU ms per request, errors; the
    ``requests`` of each cell sent in ``rounds`` blocks, alternating over servers and concurrencies."""
    cells: dict[tuple[str, int], dict[str, list]] = {}
    per_block = max(1, requests // rounds)
    for _ in range(rounds):
        for name, port in ports.items():
            for conc in CONCURRENCY:
                cell = cells.setdefault((name, conc), {"lat": [], "wall": [], "cpu": [], "switches": [], "codes": []})

                def one(i: int, port: int = port, cell: dict = cell) -> int:
                    t = time.perf_counter()
                    code = _post(port, bodies[i % len(bodies)])
                    cell["lat"].append(time.perf_counter() - t)
                    return code

                (cpu, switches), t = _usage(pids[name]), time.perf_counter()
                with ThreadPoolExecutor(conc) as pool:
                    cell["codes"] += list(pool.map(one, range(per_block)))
                cell["wall"].append(time.perf_counter() - t)
                after = _usage(pids[name])
                cell["cpu"].append(after[0] - cpu)
                cell["switches"].append(after[1] - switches)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for (name, conc), c in cells.items():
        n, lat = len(c["codes"]), np.asarray(c["lat"]) * 1000
        out.setdefault(name, {})[conc] = {
            "req_per_s": round(n / sum(c["wall"]), 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "cpu_ms_per_req": round(1000 * sum(c["cpu"]) / n, 2),
            "switches_per_req": round(sum(c["switches"]) / n, 1),
            "errors": sum(code != 200 for code in c["codes"]), "requests": n}
    return out


def at_concurrency_32(port: int, bodies: list[bytes]) -> dict[str, float]:
    """:data:`C32_REQUESTS` requests at concurrency 32: answers by class, connection errors apart."""
    t, before = time.perf_counter(), len(RECONNECTS)
    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda i: _post(port, bodies[i % len(bodies)]), range(C32_REQUESTS)))
    wall, reconnects = time.perf_counter() - t, len(RECONNECTS) - before
    return {"requests": C32_REQUESTS, "req_per_s": round(C32_REQUESTS / wall, 1), "reconnects": reconnects,
            "ok": sum(c == 200 for c in codes), "http_5xx": sum(c >= 500 for c in codes),
            "http_4xx": sum(400 <= c < 500 for c in codes), "connection_errors": sum(c == 0 for c in codes)}


def batch_stats(log: Path) -> dict[str, float]:
    """What a server's processes said when they stopped: requests, chips and forward passes (all its requests,
    the latency blocks included)."""
    total = {"requests": 0, "chips": 0, "forwards": 0}
    for m in re.finditer(r"mapex serve: (\d+) requests \((\d+) chips\) in (\d+) forward passes",
                         log.read_text() if log.is_file() else ""):
        for key, value in zip(total, m.groups(), strict=True):
            total[key] += int(value)
    return dict(total, requests_per_forward=round(total["requests"] / max(1, total["forwards"]), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="project folder with the registry (make demo)")
    ap.add_argument("--app", default="landcover-s2")
    ap.add_argument("--requests", type=int, default=1000, help="per server and concurrency")
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks the requests are sent in")
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--dim", type=int, help="serve a model of this width (with --depth and --heads) instead")
    ap.add_argument("--depth", type=int)
    ap.add_argument("--heads", type=int)
    args = ap.parse_args()
    scaled = (args.dim, args.depth, args.heads)
    if any(scaled) and not all(scaled):
        ap.error("--dim, --depth and --heads go together")
    os.chdir(args.project)
    import tempfile

    import mlflow

    from mapex_core import tracking
    from mapex_core.apps import get_application
    from mapex_core.contract import encode_array
    from mapex_core.data.chips import ChipStore, collate

    load = os.getloadavg()
    tracking.configure()
    app = get_application(args.app, "params.yaml")
    raw = ChipStore.open(app.chips, modalities=app.modalities, split="test", normalize=False)
    chips = [{m: collate([raw[i]])[m].numpy() for m in app.modalities} for i in range(min(8, len(raw)))]
    tmp = Path(tempfile.mkdtemp(prefix="mapex-bench-serve-"))
    env = dict(os.environ)
    env.pop("MAPEX_SERVE_MAX_BATCH", None)
    env.pop("MAPEX_SERVE_MAX_WAIT_MS", None)
    env.pop("MAPEX_SERVE_BATCH_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)  # (the default server gives each of its workers its share of the cores)
    try:
        if all(scaled):
            env["MLFLOW_TRACKING_URI"] = scaled_store(args.app, *scaled, tmp)
        version = tracking.model_version_for(args.app, "champion")
        model = mlflow.pyfunc.load_model(f"models:/mapex-{args.app}@champion")
        floor_uri = floor_store(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    compact = [json.dumps({"inputs": {m: encode_array(a) for m, a in c.items()}}).encode() for c in chips]
    dtypes = {m: encode_array(a)["dtype"] for m, a in chips[0].items()}

    from mapex_core.tracking.server import serve_workers

    n_default = serve_workers()  # what `mapex serve` runs without --workers
    default = f"default, {n_default} worker{'s' if n_default != 1 else ''}"
    servers = {"batched, 1 worker": (args.app, ["--workers", "1"], {}),
               "unbatched": (args.app, ["--workers", "1", "--max-batch", "1"], {}),
               default: (args.app, [], {}),
               "floor": ("bench-floor", ["--workers", "1"], {"MLFLOW_TRACKING_URI": floor_uri})}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs, ports = start_servers(servers, env, tmp)
        for port in ports.values():  # warm-up: 8 clients at once, so that each worker of the default likely gets some
            with ThreadPoolExecutor(8) as pool:
                assert all(code == 200 for code in pool.map(lambda b, port=port: _post(port, b), compact * 4))
        import torch

        inner = model.unwrap_python_model()
        normed = [{m: torch.from_numpy(a) for m, a in inner.contract.normalize(inner.contract.validate(c)).items()}
                  for c in chips]

        def forward(x: dict) -> None:
            with torch.inference_mode():
                inner.model(x)

        # the same forward with the serving forward thread's intra-op threads, on a thread of its own (timed there)
        from mapex_core.tracking.batching import forward_threads

        default_threads, serving_threads = torch.get_num_threads(), forward_threads()
        lone = ThreadPoolExecutor(1)
        lone.submit(torch.set_num_threads, serving_threads).result()
        torch.set_num_threads(default_threads)  # (this thread's, and torch's default for new threads)

        def timed_forward(x: dict) -> float:
            t = time.perf_counter()
            forward(x)
            return time.perf_counter() - t

        # Latency: alternate in blocks of BLOCK calls of each kind: the machine's drift hits all alike, while a
        # process's idle OpenMP threads (which spin for a while after a forward) only disturb the first call of
        # the next block, not every call of the other kind.
        calls = {"served": lambda i: _post(ports["batched, 1 worker"], compact[i % len(compact)]) == 200,
                 "served_unbatched": lambda i: _post(ports["unbatched"], compact[i % len(compact)]) == 200,
                 "served_default": lambda i: _post(ports[default], compact[i % len(compact)]) == 200,
                 "floor": lambda i: _post(ports["floor"], compact[i % len(compact)]) == 200,
                 "pyfunc": lambda i: model.predict(chips[i % len(chips)]) is not None,
                 "forward": lambda i: forward(normed[i % len(normed)]) is None,
                 "forward_cold": lambda i: forward(normed[i % len(normed)]) is None,
                 "forward_serving_threads": lambda i: lone.submit(timed_forward, normed[i % len(normed)]).result()}
        kinds: dict[str, list[float]] = {k: [] for k in calls}
        for start in range(0, args.latency_runs, BLOCK):
            for kind, call in calls.items():
                for i in range(start, min(start + BLOCK, args.latency_runs)):
                    if kind == "forward_cold":
                        time.sleep(PAUSE_MS / 1000)
                    t = time.perf_counter()
                    ok = call(i)
                    took = time.perf_counter() - t
                    kinds[kind].append(ok if kind == "forward_serving_threads" else took)  # (timed in its thread)
                    assert ok, kind
        lone.shutdown()
        model_ports = {k: v for k, v in ports.items() if k != "floor"}
        through = throughput(model_ports, {k: procs[k].pid for k in model_ports}, compact, args.requests, args.rounds)
        c32 = at_concurrency_32(ports[default], compact)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(60)
        shared = {name: batch_stats(tmp / f"{name.replace(' ', '_')}.log") for name in procs}
        shutil.rmtree(tmp, ignore_errors=True)
    load = (load, os.getloadavg())
    p50 = {k: float(np.percentile(np.asarray(v) * 1000, 50)) for k, v in kinds.items()}
    p99 = {k: float(np.percentile(np.asarray(v) * 1000, 99)) for k, v in kinds.items()}
    # over the faster of the two in-process forwards (torch's threads, or the serving forward thread's)
    fastest = min(p50["forward"], p50["forward_serving_threads"])
    over = {k: (p50[k] - p50["floor"]) / fastest for k in ("served", "served_unbatched", "served_default")}
    params = inner.model.num_parameters()
    print(f"mapex-{args.app} v{version} ({params / 1e6:.2f} M parameters), 1-chip compact requests "
          f"({len(compact[0]) / 1000:.0f} kB, {dtypes}); load average {load[0][0]:.2f} before, {load[1][0]:.2f} after "
          f"on {os.cpu_count()} CPUs")
    labels = {"served": "served, batched, 1 worker", "served_unbatched": "served, unbatched (--max-batch 1)",
              "served_default": f"served, {default} (as shipped)",
              "floor": "floor: a model that returns at once", "pyfunc": "in-process pyfunc predict",
              "forward": f"in-process forward ({default_threads} threads)",
              "forward_cold": f"in-process forward after {PAUSE_MS:g} ms",
              "forward_serving_threads": f"in-process forward ({serving_threads} thread(s), as served)"}
    print(f"latency, one client, {args.latency_runs} calls each in blocks of {BLOCK}:")
    for k, label in labels.items():
        print(f"  {label:44s} p50 {p50[k]:7.2f} ms  p99 {p99[k]:7.2f} ms")
    for k in over:
        print(f"  ({labels[k].split(', ', 1)[1]} p50 - floor p50) / faster forward p50: {over[k]:.2f}"
              "  (goal <= 1.25)")
    print(f"throughput, {args.requests} requests per cell in {args.rounds} alternating blocks:")
    for name, row in through.items():
        cells = "  ".join(f"c{c}: {r['req_per_s']:6.1f}/s p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms "
                          f"cpu {r['cpu_ms_per_req']:5.2f} ms/req {r['switches_per_req']:5.0f} switches/req err {r['errors']}"
                          for c, r in row.items())
        print(f"  {name:19s} {cells}")
        print(f"  {'':19s} c8/c1 {row[8]['req_per_s'] / row[1]['req_per_s']:.2f} (goal >= 1.5)   "
              f"p99/p50 at c8 {row[8]['p99_ms'] / row[8]['p50_ms']:.2f} (goal <= 3)")
    for name, st in shared.items():
        if st["forwards"]:
            print(f"{name}: {st['requests']} requests ({st['chips']} chips) in {st['forwards']} forward passes, "
                  f"{st['requests_per_forward']} requests per forward (all its requests)")
    print(f"{C32_REQUESTS} requests at concurrency 32 ({default}): {c32['ok']} answered, {c32['http_5xx']} 5xx, "
          f"{c32['connection_errors']} connection errors ({c32['reconnects']} idle kept-alive connections reopened), "
          f"{c32['req_per_s']} requests/s")
    print(json.dumps({"app": args.app, "version": version, "params": params, "scaled": all(scaled),
                      "load_average": [round(load[0][0], 2), round(load[1][0], 2)], "cpus": os.cpu_count(),
                      "body_bytes": len(compact[0]), "compact_dtypes": dtypes,
                      "p50_ms": {k: round(v, 2) for k, v in p50.items()},
                      "p99_ms": {k: round(v, 2) for k, v in p99.items()},
                      "threads": {"forward": default_threads, "forward_serving_threads": serving_threads},
                      "served_minus_floor_over_forward": {k: round(v, 2) for k, v in over.items()},
                      "throughput": through,
                      "c8_over_c1": {n: round(r[8]["req_per_s"] / r[1]["req_per_s"], 2) for n, r in through.items()},
                      "p99_over_p50_c8": {n: round(r[8]["p99_ms"] / r[8]["p50_ms"], 2) for n, r in through.items()},
                      "c32": dict(c32, server=default), "batching": {k: v for k, v in shared.items() if v["forwards"]}}))


if __name__ == "__main__":
    main()
