"""Pruned vs unpruned for a single-modality application: size, memory and latency side by side.

A ViT-B-sized MAPEX (dim 768, depth 12, MoE every 2nd block, 4 experts per modality for S1,
S2 L2A and S2 L1C: about 400 M parameters) is pruned for a Sentinel-1 application with
routing statistics from the real Sen1Floods11 chip in ../shared/data (coverage 0.99). Then,
alternating, a fresh process loads each model (encoder only, as deployed) and runs it on S1
chips at batch 1 and 32; it reports its peak RSS (with every weight page touched, as in a
server that holds the model; and once more as loaded, where safetensors maps the file and only
the weights that inference uses become resident). The process sets glibc's mmap threshold as
serving and ``mapex predict`` do (``mapex_core._env.return_freed_memory``); the all-resident
peak is measured once more with glibc's defaults, side by side. Latencies are measured with both models
loaded in one process, their calls alternating, so machine noise hits both alike. The weights are a random
initialisation: sizes, memory and latency do not depend on training. Prints a table, then one
JSON line.

    python bench/prune.py [--dim 768 --depth 12 --experts-per-modality 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))

CHILD = r"""
import json, statistics, sys, time
import torch
from mapex_core._env import return_freed_memory
if "--malloc-default" not in sys.argv:
    return_freed_memory()  # as the serving process and `mapex predict` do
from mapex_core.model import load_model
from mapex_core.model.heads import strip_decoder
path, chip, materialize = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
enc = strip_decoder(load_model(path)).eval()
out = {}
if materialize:  # touch every weight page: safetensors maps the file lazily, so without this
    with torch.no_grad():  # an expert no token reaches would never become resident
        out["checksum"] = float(sum(float(p.sum()) for p in enc.parameters()))  # no copies
with torch.inference_mode():
    for b, runs in ((1, 10), (32, 2)):
        x = {"s1": torch.randn(b, 2, chip, chip)}
        enc.encode(x)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter(); enc.encode(x); ts.append((time.perf_counter() - t0) * 1e3)
        out[f"latency_b{b}_ms"] = statistics.median(ts)
# VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's peak over exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def interleaved_latency(tmp: Path, chip: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median latencies of both models loaded in this process, calls alternating (noise cancels)."""
    import torch

    from mapex_core.model import load_model
    from mapex_core.model.heads import strip_decoder

    encs = {n: strip_decoder(load_model(tmp / n)).eval() for n in ("full", "pruned")}
    out: dict[str, dict[str, float]] = {n: {} for n in encs}
    torch.manual_seed(0)
    with torch.inference_mode():
        for b, runs in ((1, 10 * rounds), (32, rounds)):
            x = {"s1": torch.randn(b, 2, chip, chip)}
            times: dict[str, list[float]] = {n: [] for n in encs}
            for enc in encs.values():
                enc.encode(x)  # warm-up
            for _ in range(runs):
                for n, enc in encs.items():
                    t0 = time.perf_counter()
                    enc.encode(x)
                    times[n].append((time.perf_counter() - t0) * 1e3)
            for n in encs:
                out[n][f"latency_b{b}_ms"] = statistics.median(times[n])
    return out


def run_child(path: Path, chip: int, materialize: bool, malloc_default: bool = False) -> dict[str, float]:
    cmd = [sys.executable, "-c", CHILD, str(path), str(chip), "1" if materialize else "0"]
    res = subprocess.run(cmd + (["--malloc-default"] if malloc_default else []), capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--experts-per-modality", type=int, default=4)
    ap.add_argument("--chip", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--latency-rounds", type=int, default=8, help="batch-32 calls per model (batch 1: 10x)")
    args = ap.parse_args()

    import torch

    from mapex_core.data.chips import ChipStore, PresenceBatchSampler, collate
    from mapex_core.data.ingest import ingest
    from mapex_core.model import MapexConfig, MapexModel, save_model
    from mapex_core.pruning import PruneParams, calibrate, prune_model, prune_report, select_experts

    with tempfile.TemporaryDirectory(prefix="mapex-bench-prune-") as tmp:
        tmp = Path(tmp)
        store_path = ingest(SHARED / "sen1floods11_sample", tmp / "flood.zarr", reports_dir=tmp / "r",
                            chip_size=args.chip)["out"]
        torch.manual_seed(0)
        cfg = MapexConfig(modalities=["s1", "s2", "s2l1c"], img_size=args.chip, dim=args.dim, depth=args.depth,
                          heads=args.heads, moe_every=2, experts_per_modality=args.experts_per_modality, top_k=2)
        full = MapexModel(cfg).eval()
        store = ChipStore.open(store_path, modalities=["s1"])
        batches = [collate([store[i] for i in idx]) for idx in PresenceBatchSampler(store, 16, drop_last=False).batches(0)]
        stats = calibrate(full, batches, ["s1"])
        kept = select_experts(full, stats, ["s1"], PruneParams(coverage=0.99))
        pruned = prune_model(full, ["s1"], kept)
        report = prune_report(full, pruned, stats, ["s1"], kept, 0.0, PruneParams())
        save_model(full, tmp / "full")
        save_model(pruned, tmp / "pruned")
        n_full, n_pruned = full.num_parameters(), pruned.num_parameters()
        del full, pruned
        runs: dict[str, list[dict[str, float]]] = {"full": [], "pruned": []}
        lazy: dict[str, float] = {}
        glibc: dict[str, list[float]] = {"full": [], "pruned": []}  # glibc's default malloc thresholds
        for _ in range(args.repeats):
            for name in ("full", "pruned"):
                runs[name].append(run_child(tmp / name, args.chip, materialize=True))
                glibc[name].append(run_child(tmp / name, args.chip, materialize=True,
                                             malloc_default=True)["peak_rss_mb"])
        for name in ("full", "pruned"):  # as loaded (weights mapped, resident only when used)
            lazy[name] = run_child(tmp / name, args.chip, materialize=False)["peak_rss_mb"]
        bytes_ = {n: (tmp / n / "model.safetensors").stat().st_size for n in ("full", "pruned")}
        latency = interleaved_latency(tmp, args.chip, args.latency_rounds)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    result = {
        "params_full": n_full, "params_pruned": n_pruned, "params_ratio": round(n_pruned / n_full, 3),
        "bytes_full": bytes_["full"], "bytes_pruned": bytes_["pruned"],
        "bytes_ratio": round(bytes_["pruned"] / bytes_["full"], 3),
        "rss_full_mb": round(med["full"]["peak_rss_mb"], 1), "rss_pruned_mb": round(med["pruned"]["peak_rss_mb"], 1),
        "rss_ratio": round(med["pruned"]["peak_rss_mb"] / med["full"]["peak_rss_mb"], 3),
        "rss_glibc_default_full_mb": round(statistics.median(glibc["full"]), 1),
        "rss_glibc_default_pruned_mb": round(statistics.median(glibc["pruned"]), 1),
        "rss_glibc_default_ratio": round(statistics.median(glibc["pruned"]) / statistics.median(glibc["full"]), 3),
        "rss_lazy_full_mb": round(lazy["full"], 1), "rss_lazy_pruned_mb": round(lazy["pruned"], 1),
        "rss_lazy_ratio": round(lazy["pruned"] / lazy["full"], 3),
        "latency_b1_ratio": round(latency["pruned"]["latency_b1_ms"] / latency["full"]["latency_b1_ms"], 3),
        "latency_b32_ratio": round(latency["pruned"]["latency_b32_ms"] / latency["full"]["latency_b32_ms"], 3),
        "kept_experts": report["kept_experts"],
    }
    print(f"MAPEX dim {args.dim} depth {args.depth}, {cfg.num_experts} experts per MoE layer, pruned for S1 "
          f"(coverage 0.99); medians of {args.repeats} fresh processes each")
    print(f"{'':14s} {'unpruned':>12s} {'pruned':>12s} {'ratio':>7s}")
    print(f"{'parameters':14s} {n_full:12d} {n_pruned:12d} {result['params_ratio']:7.3f}")
    print(f"{'checkpoint B':14s} {bytes_['full']:12d} {bytes_['pruned']:12d} {result['bytes_ratio']:7.3f}")
    print(f"{'peak RSS MB':14s} {med['full']['peak_rss_mb']:12.0f} {med['pruned']['peak_rss_mb']:12.0f} "
          f"{result['rss_ratio']:7.3f}  (all weights resident)")
    print(f"{'  glibc default':14s} {result['rss_glibc_default_full_mb']:12.0f} "
          f"{result['rss_glibc_default_pruned_mb']:12.0f} {result['rss_glibc_default_ratio']:7.3f}  "
          "(all resident, without return_freed_memory)")
    print(f"{'  lazy':14s} {lazy['full']:12.0f} {lazy['pruned']:12.0f} {result['rss_lazy_ratio']:7.3f}  "
          "(mapped weights, only the used ones resident)")
    for b in (1, 32):
        k = f"latency_b{b}_ms"
        print(f"{'latency b' + str(b) + ' ms':14s} {latency['full'][k]:12.1f} {latency['pruned'][k]:12.1f} "
              f"{result[f'latency_b{b}_ratio']:7.3f}  (one process, calls alternating)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
