"""Whole-scene inference (`mapex predict`) against a plain batched forward over the same windows.

The scene is the real Sen1Floods11 S1 chip in ../shared/data stacked vertically (``--repeats``
times: 512 x 512 px each). The model is the ``params.yaml`` architecture for an S1 segmentation
application (weights untrained: speed does not depend on them). Measured in one run, alternating:
``predict_scene`` (read, normalise, forward, blend, write a COG) and the forward pass alone on the
same windows already in memory, same batch size. Then the peak RSS of ``predict_scene`` (after
``return_freed_memory()``, as ``mapex predict`` runs it) for two scene heights, each in a fresh process that reads its own peak (``VmHWM`` of /proc/self/status;
not ``ru_maxrss``, which a child inherits from its parent on Linux). Prints a table, then one JSON line.
The taller scene is ``tests.helpers.tall_scene``: the one the memory test maps.

    python bench/predict.py [--repeats 4] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds tests/
    sys.path.insert(0, str(ROOT))

from tests.helpers import tall_scene  # noqa: E402 - the same taller scene the memory test maps

RSS = """
import json, sys
sys.path.insert(0, sys.argv[3])
from bench.predict import build_model
from mapex_core._env import return_freed_memory
from mapex_core.predict import predict_scene
from tests.helpers import peak_rss_kb
return_freed_memory()  # what `mapex predict` does first
s = predict_scene(build_model(), {"s1": sys.argv[1]}, sys.argv[2], output="probabilities")
print(json.dumps({"windows": s["windows"], "peak_mb": peak_rss_kb() / 1024}))
"""


def build_model():  # noqa: ANN201 - TaskModel
    import torch

    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel
    from mapex_core.params import load_params, section

    torch.manual_seed(0)
    cfg = section(MapexConfig, load_params(ROOT / "params.yaml"), "model")
    cfg = MapexConfig.from_dict({**cfg.to_dict(), "modalities": ["s1"],
                                 "normalization": {"s1": {"mean": [-12.0, -19.0], "std": [3.0, 4.0]}}})
    return TaskModel(MapexModel(cfg, with_decoder=False), "segmentation", ["dry", "water"],
                     input_modalities=["s1"]).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import rasterio
    import torch

    from mapex_core.contract import InputContract
    from mapex_core.predict import predict_scene, window_offsets

    model = build_model()
    contract = InputContract.of(model)
    chip, overlap = contract.chip_size, 16
    with tempfile.TemporaryDirectory() as tmp:
        scene = tall_scene(Path(tmp) / "scene.tif", args.repeats)
        with rasterio.open(scene) as src:
            data = src.read(masked=True).astype(np.float32).filled(np.nan)
        rows = window_offsets(data.shape[1], chip, chip - overlap)
        cols = window_offsets(data.shape[2], chip, chip - overlap)
        tiles = np.stack([data[:, r:r + chip, c:c + chip] for r in rows for c in cols])
        tiles = np.nan_to_num(contract.normalize({"s1": tiles})["s1"])
        n = len(tiles)
        t_pred, t_fwd = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            predict_scene(model, {"s1": scene}, Path(tmp) / "out.tif", batch_size=args.batch_size,
                          overlap=overlap, output="probabilities")
            t_pred.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, n, args.batch_size):
                    torch.softmax(model({"s1": torch.from_numpy(tiles[i:i + args.batch_size])}), 1).numpy()
            t_fwd.append(time.perf_counter() - t)
        rss = {}
        for reps in (2, 8):
            sc = tall_scene(Path(tmp) / f"rss{reps}.tif", reps)
            res = subprocess.run([sys.executable, "-c", RSS, str(sc), str(Path(tmp) / f"r{reps}.tif"), str(ROOT)],
                                 capture_output=True, text=True, check=True)
            rss[f"{reps * 512}x512"] = json.loads(res.stdout.strip().splitlines()[-1])
    pred, fwd = min(t_pred), min(t_fwd)
    print(f"scene {data.shape[1]} x {data.shape[2]} px, {n} windows of {chip} px (overlap {overlap}), "
          f"batch {args.batch_size}, best of {args.runs}")
    print(f"predict_scene : {pred:6.2f} s  {n / pred:7.1f} windows/s")
    print(f"forward only  : {fwd:6.2f} s  {n / fwd:7.1f} windows/s")
    for k, v in rss.items():
        print(f"peak RSS {k}: {v['peak_mb']:.0f} MB ({v['windows']} windows)")
    print(json.dumps({"predict_vs_forward_throughput": round(fwd / pred, 3), "windows": n,
                      "peak_rss_mb": {k: round(v["peak_mb"]) for k, v in rss.items()}}))


if __name__ == "__main__":
    main()
