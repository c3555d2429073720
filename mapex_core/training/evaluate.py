"""Evaluation of an application: its pruned model against the unpruned one and a from-scratch one.

``evaluate_app`` compares, on the test split and with the same labels, budget and seeds (one list
of variants, :data:`mapex_core.apps.VARIANTS`):

* **pruned**: the pruned, fine-tuned model (the one that is registered);
* **unpruned**: the whole pre-trained model, fed the application's modalities only, fine-tuned alike;
* **scratch**: the pruned architecture trained from random weights (what pre-training buys).

Each gets its metric with a bootstrap 95% interval (over spatial groups of chips), parameters,
checkpoint bytes and batch-1 latency, in one JSON report.

The unpruned and scratch models, and the pruned ones of other seeds, are the comparison models of
:mod:`mapex_core.training.compare`: the pipeline trains them in stage compare@APP beside fine-tuning,
and ``evaluate_app`` loads them from its folder (``compared``); those it does not find there it
trains itself, through the same function, with the same weights.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapex_core.apps import VARIANTS, Application, check_compatible
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.io import atomic_write_json, check_output_file, json_with_keys
from mapex_core.metrics import summarize
from mapex_core.model import load_model
from mapex_core.model.heads import TaskModel, load_task_model, save_task_model
from mapex_core.runtime import resolve_device

# Job and run_jobs live in compare; the sweep and the ablations import them from here
from mapex_core.training.compare import Job as Job
from mapex_core.training.compare import (
    comparison_key,
    comparison_runs,
    fit_comparisons,
    load_comparisons,
)
from mapex_core.training.compare import run_jobs as run_jobs
from mapex_core.training.finetune import inputs_of, open_app_store, predict

REPORT_KEYS = ("app", "metric", "test_chips", *VARIANTS)  # how an existing evaluation report is recognised


def check_report_path(out: str | Path, force: bool = False) -> None:
    """Whether the evaluation report may be written to ``out`` (absent, or an evaluation report).

    Raises:
        OutputConflict: ``out`` is a folder, or another file (unless ``force``).
    """
    check_output_file(out, "an evaluation report written by MAPEX", lambda p: json_with_keys(p, REPORT_KEYS), force)


def bootstrap_groups(store: ChipStore) -> np.ndarray:
    """Independent units for the bootstrap: the source sample, or its split block."""
    meta = store.metadata()
    block = int(store.ds.attrs.get("split_block") or 0)
    if block:
        return np.array([f"{s}/{r // block}_{c // block}" for s, r, c in zip(meta["sample"], meta["row"], meta["col"],
                                                                             strict=True)])
    return meta["sample"].to_numpy()


def pruned_model_history(finetuned: str | Path) -> dict[str, Any]:
    """The training history saved next to a fine-tuned model (empty when absent)."""
    path = Path(finetuned) / "finetune.json"
    return json.loads(path.read_text()).get("history", {}) if path.is_file() else {}


def latency_ms(model: TaskModel, store: ChipStore, runs: int, device: torch.device) -> float:
    """Median wall time of a batch-1 forward pass (after warm-up)."""
    model.eval()
    x = inputs_of(collate([store[0]]), model.modalities, device)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(max(1, runs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def checkpoint_bytes(model: TaskModel) -> int:
    """Size of the model's ``model.safetensors``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_task_model(model, tmp)
        return (Path(tmp) / "model.safetensors").stat().st_size

def _variant_report(model: TaskModel, app: Application, outputs: list[np.ndarray], targets: np.ndarray,
                    test: ChipStore, dev: torch.device, histories: list[dict[str, Any]]) -> dict[str, Any]:
    rep = summarize(app.metric, model.class_names, outputs, targets, app.finetune.bootstrap,
                    groups=bootstrap_groups(test))
    rep.update(params=model.num_parameters(), checkpoint_bytes=checkpoint_bytes(model),
               latency_ms=latency_ms(model, test, app.finetune.latency_runs, dev),
               input_modalities=model.modalities, model_modalities=model.encoder.config.modalities,
               training=histories)
    return rep


def evaluate_app(app: Application, finetuned: str | Path, chips: str | Path, out: str | Path | None = None,
                 device: str = "auto", pretrained: str | Path | None = None,
                 on_step: Callable[[int, int, dict[str, Any]], None] | None = None,
                 concurrency: Callable[[], int] | None = None, force: bool = False,
                 compared: str | Path | None = None) -> dict[str, Any]:
    """Compare pruned, unpruned and from-scratch models of ``app`` on the test split.

    Args:
        finetuned: a task model written by :func:`~mapex_core.training.finetune.finetune_app` (the
            pruned variant).
        pretrained: the unpruned pre-trained model; default: the lineage in ``finetuned``.
        on_step: progress callback ``(step, total, info)`` over all the fine-tuning runs it makes.
        concurrency: how many of its fine-tuning runs may train at once now (asked as runs finish;
            default: the cores it may use now, :func:`mapex_core.progress.available_cores`, over this
            process's intra-op threads; one on CUDA). The results do not depend on it.
        force: replace a file at ``out`` that is not an evaluation report.
        compared: a folder of comparison models (:func:`~mapex_core.training.compare.compare_app`, stage
            compare@APP): those made from the same inputs are loaded instead of trained (same report);
            one made from other inputs is ignored with a warning.

    Returns:
        The report (also written to ``out``, atomically): ``metric`` and, per variant, ``value``,
        ``ci95``, ``params``, ``checkpoint_bytes``, ``latency_ms``.

    Raises:
        OutputConflict: ``out`` is a folder or another file (checked before any work).
    """
    if out is not None:
        check_report_path(out, force)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    pruned_model = load_task_model(finetuned, device=dev)
    info = pruned_model.info
    pretrained = pretrained or info.get("pretrained_dir")
    if not pretrained or not Path(pretrained).exists():
        raise ValueError(f"{finetuned}: the unpruned pre-trained model ({pretrained}) is not available; "
                         "pass --pretrained DIR")
    pruned_dir = info.get("pruned_dir")
    cfg = pruned_model.encoder.config
    norm = cfg.normalization
    test = open_app_store(app, chips, "test", cfg.modalities, norm)
    if len(test) == 0:
        raise ValueError(f"{chips}: no test chips for application {app.name!r}")
    train = open_app_store(app, chips, "train", cfg.modalities, norm)
    val = open_app_store(app, chips, "val", cfg.modalities, norm)
    seeds = app.finetune.seeds
    classes = pruned_model.class_names
    full = load_model(pretrained, device=dev)
    check_compatible(app, full.config.modalities)
    report: dict[str, Any] = {"app": app.name, "task": app.task, "metric": app.metric, "modalities": app.modalities,
                              "chips": str(chips), "test_chips": len(test), "seeds": seeds,
                              "label_fraction": app.finetune.label_fraction, "mode": app.finetune.mode,
                              "pretrained": str(pretrained), "finetuned": str(finetuned)}

    fingerprint = ChipStore.open(chips, in_memory=False).fingerprint()
    # pruned: the given fine-tuned model is used for its own seed only if it was trained on this
    # store (same chips, splits and labels), with this budget and these classes; otherwise (and
    # for the other seeds) the pruned model is fine-tuned here like the other variants
    mismatch = [what for what, ok in (
        ("chip store", info.get("chips_fingerprint") == fingerprint),
        ("fine-tuning budget", info.get("finetune") == app.finetune.__dict__),
        ("classes", classes == (test.class_names or [])),
    ) if not ok]
    if mismatch and pruned_dir is None:
        raise ValueError(f"{finetuned} was fine-tuned with a different {', '.join(mismatch)} and records no "
                         "pruned model to fine-tune again")
    report["pruned_checkpoint_reused"] = not mismatch
    report["pruned_retrained_because"] = mismatch
    reuse_seed = info.get("seed") if not mismatch else None
    classes = test.class_names or classes

    # the comparison models: from compare@APP's folder when it was made from these inputs, else trained here
    runs = comparison_runs(seeds, reuse_seed)
    fitted, unusable = {}, None
    if compared is not None:
        key = comparison_key(app, classes, fingerprint, pruned_dir, pretrained)
        fitted, unusable = load_comparisons(compared, key, runs, dev)
    if unusable:
        warnings.warn(f"{unusable}: its comparison models are trained here instead", stacklevel=2)
    missing = [r for r in runs if r not in fitted]
    if missing:
        fitted |= fit_comparisons(app, missing, pruned=pruned_dir, cfg=cfg, full=full, classes=classes, train=train,
                                  val=val, dev=dev, on_step=on_step, concurrency=concurrency)
    for variant in VARIANTS:  # one report per variant, over its seeds, in seed order
        mine = [fitted.get((variant, s), (pruned_model, None)) for s in seeds]
        outputs, targets = [], None
        for model, _ in mine:
            o, targets = predict(model, test, app.finetune.batch_size, dev)
            outputs.append(o)
        hists = [h if h is not None else pruned_model_history(finetuned) for _, h in mine]
        shown = pruned_model if variant == "pruned" else mine[-1][0]
        report[variant] = _variant_report(shown, app, outputs, targets, test, dev, hists)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        check_report_path(out, force)  # again: something may have appeared meanwhile
        atomic_write_json(out, report)
    return report
