"""Evaluation of an application: its pruned model against the unpruned one and a from-scratch one.

``evaluate_app`` compares, on the test split and with the same labels, budget and seeds (one list
of variants, :data:`mapex_core.apps.VARIANTS`):

* **pruned**: the pruned, fine-tuned model (the one that is registered);
* **unpruned**: the whole pre-trained model, fed the application's modalities only, fine-tuned alike;
* **scratch**: the pruned architecture trained from random weights (what pre-training buys).

Each gets its metric with a bootstrap 95% interval (over spatial groups of chips), parameters,
checkpoint bytes and batch-1 latency, in one JSON report.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapex_core.apps import VARIANTS, Application, check_compatible
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.io import atomic_write_json, check_output_file, json_with_keys
from mapex_core.metrics import summarize
from mapex_core.model import MapexModel, load_model
from mapex_core.model.heads import TaskModel, load_task_model, save_task_model
from mapex_core.progress import available_cores
from mapex_core.runtime import cpu_count, resolve_device
from mapex_core.training.finetune import (
    RNG_LOCK,
    inputs_of,
    open_app_store,
    predict,
    task_model,
    train_task,
)

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


@dataclass
class Job:
    """One model of the comparison: which variant and seed, how to build it, whether to train it."""

    variant: str
    seed: int
    make: Callable[[], TaskModel]
    balance: float = 0.0
    train: bool = True


def run_jobs(jobs: list[Job], fit: Callable[[TaskModel, Job], dict[str, Any] | None],
              concurrency: Callable[[], int]) -> list[tuple[TaskModel, dict[str, Any] | None]]:
    """Build and fit every job, up to ``concurrency()`` at once (asked again as jobs finish); results in job order.

    The jobs run in threads of this process: torch releases the GIL in its kernels, and every job
    keeps the intra-op thread count of the process, so its arithmetic (and its weights) are the same
    as when the jobs run one after the other (measured: 1.85x faster for two jobs on two cores,
    identical weights).
    """
    results: dict[int, tuple[TaskModel, dict[str, Any] | None]] = {}

    def run(i: int) -> None:
        with RNG_LOCK:  # the global RNG initialises the head (and the scratch encoder): one job at a time
            model = jobs[i].make()
        results[i] = (model, fit(model, jobs[i]) if jobs[i].train else None)

    pending = list(range(len(jobs)))
    with ThreadPoolExecutor(max_workers=max(1, cpu_count())) as pool:
        running: set[Future] = set()
        while pending or running:
            while pending and len(running) < max(1, concurrency()):
                running.add(pool.submit(run, pending.pop(0)))
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raise a job's error
    return [results[i] for i in range(len(jobs))]


def evaluate_app(app: Application, finetuned: str | Path, chips: str | Path, out: str | Path | None = None,
                 device: str = "auto", pretrained: str | Path | None = None,
                 on_step: Callable[[int, int, dict[str, Any]], None] | None = None,
                 concurrency: Callable[[], int] | None = None, force: bool = False) -> dict[str, Any]:
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

    # pruned: the given fine-tuned model is used for its own seed only if it was trained on this
    # store (same chips, splits and labels), with this budget and these classes; otherwise (and
    # for the other seeds) the pruned model is fine-tuned here like the other variants
    mismatch = [what for what, ok in (
        ("chip store", info.get("chips_fingerprint") == ChipStore.open(chips, in_memory=False).fingerprint()),
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

    def scratch(s: int) -> TaskModel:
        torch.manual_seed(s)
        return task_model(MapexModel(cfg, with_decoder=False).to(dev), app, classes, {}, s)

    jobs = [Job("pruned", s, lambda: pruned_model, train=False) if s == reuse_seed else
            Job("pruned", s, lambda s=s: task_model(load_model(pruned_dir, device=dev), app, classes, {}, s))
            for s in seeds]
    jobs += [Job("unpruned", s, lambda s=s: task_model(copy.deepcopy(full), app, classes, {}, s),
                  full.config.balance_loss_weight) for s in seeds]
    jobs += [Job("scratch", s, lambda s=s: scratch(s)) for s in seeds]
    steps = app.finetune.steps
    n_runs = sum(j.train for j in jobs)
    progress_of: dict[int, int] = {}  # step reached by each training job
    lock = threading.Lock()

    def fit(model: TaskModel, job: Job) -> dict[str, Any]:
        def step_cb(step: int, total: int, info: dict[str, Any]) -> None:
            with lock:
                progress_of[id(job)] = step
                if on_step is not None:
                    on_step(sum(progress_of.values()), n_runs * steps, info | {"run": f"{job.variant} seed {job.seed}"})

        return train_task(model, train, val, app.metric, app.finetune, job.seed, dev, job.balance, on_step=step_cb)

    if concurrency is None:
        def concurrency() -> int:
            return 1 if dev.type == "cuda" else available_cores() // torch.get_num_threads()

    fitted = run_jobs(jobs, fit, concurrency)
    for variant in VARIANTS:  # one report per variant, over its seeds, in seed order
        mine = [(job, model, hist) for job, (model, hist) in zip(jobs, fitted, strict=True) if job.variant == variant]
        outputs, targets = [], None
        for _, model, _ in mine:
            o, targets = predict(model, test, app.finetune.batch_size, dev)
            outputs.append(o)
        hists = [h if h is not None else pruned_model_history(finetuned) for _, _, h in mine]
        shown = pruned_model if variant == "pruned" else mine[-1][1]
        report[variant] = _variant_report(shown, app, outputs, targets, test, dev, hists)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        check_report_path(out, force)  # again: something may have appeared meanwhile
        atomic_write_json(out, report)
    return report
