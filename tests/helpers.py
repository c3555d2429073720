"""Helpers shared by several test modules (and by ``bench/predict.py``): the real sample files,
tiny models, a MoE layer, registry inputs, an HTML reader, a taller scene and a peak-memory reading.

Fixtures live in ``conftest.py``; this module has none. Heavy libraries are imported inside the
functions, so importing it is cheap (``conftest.py`` and the benchmark import it).
"""

from __future__ import annotations

import hashlib
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MAPEX_SHARED_DATA", ROOT.parent / "shared" / "data"))
BEN_ROOT = SHARED_DATA / "bigearthnet_mm_example"

# the real Sen1Floods11 scene chip (512 x 512 px)
S1 = SHARED_DATA / "sen1floods11_sample" / "sample" / "S1" / "Spain_7370579_S1Hand.tif"
S2 = SHARED_DATA / "sen1floods11_sample" / "sample" / "S2" / "Spain_7370579_S2Hand.tif"
NORM = {"s1": {"mean": [-12.0, -19.0], "std": [3.0, 4.0]}, "s2l1c": {"mean": [1500.0] * 13, "std": [800.0] * 13}}
WINDOWS = ((0, 0), (48, 96), (240, 384), (448, 448), (128, 320))  # (row, col) of 64 px chips


def sha(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----- models -----------------------------------------------------------------------------------
def tiny(task: str = "segmentation", modalities: tuple[str, ...] = ("s1",)):  # noqa: ANN201 - TaskModel
    """A tiny untrained task model (64 px chips, patch 8, dim 32, 2 blocks, one MoE layer), seeded."""
    import torch

    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel

    torch.manual_seed(0)
    cfg = MapexConfig(modalities=list(modalities), img_size=64, patch_size=8, dim=32, depth=2, heads=2, moe_every=2,
                      experts_per_modality=2, top_k=1, normalization={m: NORM[m] for m in modalities})
    classes = ["dry", "water"] if task == "segmentation" else ["a", "b", "c"]
    return TaskModel(MapexModel(cfg, with_decoder=False), task, classes, head_channels=4,
                     input_modalities=list(modalities)).eval()


def moe_layer(top_k: int, routing: str = "modality", seed: int = 0, **kw: Any):  # noqa: ANN201 - MoELayer
    """A seeded ``MoELayer`` (dim 32, hidden 64, 6 experts, 2 modalities) whose router matters."""
    import torch

    from mapex_core.model import MoELayer

    torch.manual_seed(seed)
    layer = MoELayer(dim=32, hidden_dim=64, num_experts=6, top_k=top_k, num_modalities=2,
                     routing=routing, **kw)
    with torch.no_grad():  # make the router matter, not only the bias
        layer.router.normal_(std=0.5)
    return layer


def switch_balance_loss(layer: Any, x: Any, modality_ids: Any) -> float:
    """The balance loss documented in :mod:`mapex_core.model.moe`, computed by hand (the oracle
    for the ``aux`` a layer returns; it shares nothing with ``MoELayer.balance_loss`` but the routing).

    Per modality present, over the experts it may use (its own group plus the shared experts; all
    experts when ``routing == "standard"``): ``f_e`` the share of its token-slots that chose expert
    ``e`` and ``P_e`` its tokens' mean router probability of ``e``, both renormalised within that
    set; the loss is ``n_allowed * sum_e f_e * P_e``, averaged over the modalities present.
    """
    import torch

    with torch.no_grad():
        probs, top_idx, _ = layer.route(x, modality_ids)
    probs, top_idx, ids = probs.double().tolist(), top_idx.tolist(), modality_ids.tolist()
    owner = layer.expert_group.tolist()
    losses = []
    for m in sorted(set(ids)):
        if layer.routing == "standard":
            allowed = list(range(layer.num_experts))
        else:
            allowed = [e for e in range(layer.num_experts) if owner[e] in (m, -1)]
        rows = [i for i, mi in enumerate(ids) if mi == m]
        slots = dict.fromkeys(allowed, 0)
        for i in rows:
            for e in top_idx[i]:
                if e in slots:
                    slots[e] += 1
        n_slots = sum(slots.values())
        mean_p = {e: sum(probs[i][e] for i in rows) / len(rows) for e in allowed}
        p_total = sum(mean_p.values())
        loss = 0.0
        for e in allowed:
            f = slots[e] / n_slots if n_slots else 0.0
            loss += f * (mean_p[e] / p_total)
        losses.append(len(allowed) * loss)
    return sum(losses) / len(losses) if losses else 0.0


# ----- real chips and scenes --------------------------------------------------------------------
def real_chips(modalities: list[str], windows=WINDOWS) -> dict[str, Any]:  # noqa: ANN001
    """Physical values (S1 dB, S2 L1C TOA x 1e4) of 64 px chips of the real Sen1Floods11 scene."""
    import numpy as np
    import rasterio

    out = {}
    for m, path in (("s1", S1), ("s2l1c", S2)):
        if m in modalities:
            with rasterio.open(path) as src:
                out[m] = np.stack([src.read(window=rasterio.windows.Window(c, r, 64, 64)).astype(np.float32)
                                   for r, c in windows])
    return out


def tall_scene(path: Path, repeats: int) -> Path:
    """The real S1 chip stacked ``repeats`` times vertically (a taller scene on the same grid)."""
    import rasterio

    with rasterio.open(S1) as src:
        data, profile = src.read(), src.profile
    profile.update(height=data.shape[1] * repeats, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        for i in range(repeats):
            dst.write(data, window=rasterio.windows.Window(0, i * data.shape[1], data.shape[2], data.shape[1]))
    return path


def peak_rss_kb() -> int:
    """This process's own peak resident set size in kB (``VmHWM`` of ``/proc/self/status``).

    Not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that survives fork and exec, so a
    child process started by a big parent (pytest) reports the parent's peak. ``VmHWM`` belongs to
    the process's own address space, which exec replaces.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value)
    raise RuntimeError("no VmHWM line in /proc/self/status (needs Linux)")


# ----- registry ---------------------------------------------------------------------------------
def version_files(root: Path, seed: int, value: float, latency: float = 5.0) -> dict[str, Any]:
    """A real (tiny, untrained) task model saved in ``root/model{seed}`` and the reports the registry reads."""
    import torch

    from mapex_core.model import MapexConfig, MapexModel
    from mapex_core.model.heads import TaskModel, save_task_model

    torch.manual_seed(seed)
    cfg = MapexConfig(modalities=["s2"], img_size=32, patch_size=16, dim=16, depth=2, heads=2, moe_every=2,
                      experts_per_modality=2, top_k=1)
    model = TaskModel(MapexModel(cfg, with_decoder=False), "multilabel", ["a", "b"], head_channels=4)
    out = root / f"model{seed}"
    save_task_model(model, out)
    n = model.num_parameters()
    variant = {"value": value, "ci95": [value - 0.1, value + 0.1], "params": n, "checkpoint_bytes": 4 * n,
               "latency_ms": latency}
    return {"finetuned_dir": out,
            "prune_report": {"params_before": 2 * n, "params_after": n, "reduction": 0.5, "coverage": {"1": 1.0}},
            "evaluation": {"pruned": variant, "unpruned": dict(variant, params=2 * n), "scratch": variant},
            "finetune_summary": {"history": {"steps": [3, 6], "train_loss": [0.7, 0.6], "val": [0.4, 0.5]}},
            "lineage": {"git_sha": "abc", "dvc_hash": "0123.dir"}}


# ----- HTML -------------------------------------------------------------------------------------
class Elements(HTMLParser):
    """Start tags with their attributes, and the page's text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        """Elements ``tag`` whose attributes contain the given values (``class_`` matches one class)."""
        out = []
        for t, a in self.tags:
            if t != tag:
                continue
            ok = True
            for k, v in attrs.items():
                if k == "class_":
                    ok &= v in a.get("class", "").split()
                else:
                    ok &= a.get(k) == v
            if ok:
                out.append(a)
        return out
