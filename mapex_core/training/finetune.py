"""Fine-tuning and evaluation of per-application models.

``finetune_app`` trains a task head (and, in ``full`` mode, the encoder) on the app's chips,
with early stopping on the validation split. ``evaluate_app`` then compares, on the same split,
labels and budget: the **pruned** fine-tuned model, the **unpruned** pre-trained model (fed the
app's modalities only) and the pruned architecture trained **from scratch**, with bootstrap 95%
intervals, parameters, checkpoint bytes and batch-1 latency.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mapex_core.apps import Application, FinetuneParams, check_compatible
from mapex_core.data.chips import ChipStore, collate
from mapex_core.model import MapexModel, load_model
from mapex_core.model.heads import TaskModel, load_task_model, save_task_model, strip_decoder
from mapex_core.training.metrics import confusion_per_chip, summarize
from mapex_core.training.pretrain import resolve_device

VARIANTS = ("pruned", "unpruned", "scratch")


def open_app_store(app: Application, chips: str | Path, split: str, model_modalities: list[str],
                   normalization: dict[str, Any] | None) -> ChipStore:
    """The app's chips of one split, normalised with the model's statistics.

    Raises:
        ValueError: the store lacks the app's modalities or the task's labels (lists what exists).
    """
    probe = ChipStore.open(chips, in_memory=False)
    check_compatible(app, model_modalities, probe.stored_modalities, probe.label_type, where=str(chips),
                     class_names=probe.class_names)
    # segmentation heads fuse every input modality's pixels: all of them must be present
    return ChipStore.open(chips, modalities=app.modalities, split=split, normalization=normalization,
                          require_all=app.task == "segmentation")


def bootstrap_groups(store: ChipStore) -> np.ndarray:
    """Independent units for the bootstrap: the source sample, or its split block."""
    meta = store.metadata()
    block = int(store.ds.attrs.get("split_block") or 0)
    if block:
        return np.array([f"{s}/{r // block}_{c // block}" for s, r, c in zip(meta["sample"], meta["row"], meta["col"],
                                                                             strict=True)])
    return meta["sample"].to_numpy()


def _batches(store: ChipStore, indices: list[int], batch_size: int, gen: torch.Generator | None) -> list[list[int]]:
    """Batches of ``indices`` that share present modalities; shuffled when ``gen`` is given."""
    allowed = set(indices)
    out = []
    for group in store.presence_patterns().values():
        idx = [i for i in group if i in allowed]
        if gen is not None:
            idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        out.extend(idx[s : s + batch_size] for s in range(0, len(idx), batch_size))
    if gen is not None:
        out = [out[j] for j in torch.randperm(len(out), generator=gen).tolist()]
    return out


def _inputs(batch: dict[str, Any], modalities: list[str], dev: torch.device) -> dict[str, torch.Tensor]:
    return {m: batch[m].to(dev) for m in modalities if m in batch}


def _loss(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    if task == "multiclass":
        return F.cross_entropy(logits, target.long())
    return F.cross_entropy(logits, target.long(), ignore_index=-1)


@torch.no_grad()
def predict(model: TaskModel, store: ChipStore, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Outputs in the form :mod:`metrics` expects, and the targets, over a whole store (store order)."""
    model.eval()
    outs, tgts, order = [], [], []
    for idx in _batches(store, list(range(len(store))), batch_size, None):
        batch = collate([store[i] for i in idx])
        logits = model(_inputs(batch, model.modalities, device)).float().cpu()
        target = batch["labels"]
        if model.task == "multilabel":
            outs.append(torch.sigmoid(logits).numpy())
            tgts.append(target.numpy().astype(np.int64))
        elif model.task == "multiclass":
            outs.append(logits.argmax(1).numpy())
            tgts.append(target.numpy())
        else:
            outs.append(confusion_per_chip(logits.argmax(1).numpy(), target.numpy(), len(model.class_names)))
            tgts.append(np.zeros(len(idx), np.int64))
        order.extend(idx)
    inv = np.argsort(order)
    return np.concatenate(outs)[inv], np.concatenate(tgts)[inv]


def validation_score(model: TaskModel, store: ChipStore, metric: str, batch_size: int, device: torch.device) -> float:
    out, tgt = predict(model, store, batch_size, device)
    return summarize(metric, model.class_names, [out], tgt, n_boot=0)["value"]


def train_task(model: TaskModel, train: ChipStore, val: ChipStore | None, metric: str, p: FinetuneParams,
               seed: int, device: torch.device, balance_weight: float = 0.0) -> dict[str, Any]:
    """Fine-tune ``model`` in place; the best validation state is restored at the end.

    Args:
        balance_weight: weight of the routers' balance loss (0 after pruning).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(train)
    if n_train == 0:
        raise ValueError(f"{train.path}: no training chips for modalities {train.modalities}")
    keep = max(1, int(round(p.label_fraction * n_train)))
    subset = sorted(torch.randperm(n_train, generator=gen)[:keep].tolist())
    model.to(device)
    if p.mode == "linear":
        for q in model.encoder.parameters():
            q.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    history: dict[str, Any] = {"steps": [], "train_loss": [], "val": [], "label_fraction": p.label_fraction,
                               "train_chips": len(subset)}
    best, best_state, best_step, bad_evals, step = -math.inf, None, 0, 0, 0
    running, n_run = 0.0, 0
    while step < p.steps:
        for idx in _batches(train, subset, p.batch_size, gen):
            model.train()
            if p.mode == "linear":
                model.encoder.eval()
            batch = collate([train[i] for i in idx])
            logits, aux = model.forward_with_aux(_inputs(batch, model.modalities, device))
            loss = _loss(model.task, logits, batch["labels"].to(device)) + balance_weight * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = p.lr * 0.5 * (1 + math.cos(math.pi * step / p.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            running += float(loss.detach())
            n_run += 1
            step += 1
            if step % p.eval_every == 0 or step == p.steps:
                has_val = val is not None and len(val) > 0
                # without validation chips there is no early stopping: the last state is kept
                score = validation_score(model, val, metric, p.batch_size, device) if has_val else float(step)
                history["steps"].append(step)
                history["train_loss"].append(running / n_run)
                history["val"].append(score)
                running, n_run = 0.0, 0
                if score > best or not math.isfinite(best):
                    best, best_state, best_step, bad_evals = score, copy.deepcopy(model.state_dict()), step, 0
                else:
                    bad_evals += 1
                if bad_evals >= p.patience:
                    step = p.steps  # early stop
            if step >= p.steps:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    has_val = val is not None and len(val) > 0
    history.update(best_step=best_step, best_val=best if has_val else None, early_stopping=has_val,
                   stopped_at=history["steps"][-1] if history["steps"] else step)
    return history


def pruned_model_history(finetuned: str | Path) -> dict[str, Any]:
    """The training history saved next to a fine-tuned model (empty when absent)."""
    path = Path(finetuned) / "finetune.json"
    return json.loads(path.read_text()).get("history", {}) if path.is_file() else {}


def latency_ms(model: TaskModel, store: ChipStore, runs: int, device: torch.device) -> float:
    """Median wall time of a batch-1 forward pass (after warm-up)."""
    model.eval()
    x = _inputs(collate([store[0]]), model.modalities, device)
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


def _task_model(encoder: MapexModel, app: Application, class_names: list[str], info: dict[str, Any],
                seed: int) -> TaskModel:
    """``encoder`` with a new task head, initialised from ``seed`` (the process's RNG is seeded randomly)."""
    torch.manual_seed(seed)
    return TaskModel(strip_decoder(encoder) if encoder.with_decoder else encoder, app.task, class_names,
                     info={"app": app.name, "metric": app.metric, **info},
                     head_channels=app.finetune.head_channels, input_modalities=app.modalities)


def finetune_app(app: Application, checkpoint: str | Path, chips: str | Path, out: str | Path,
                 device: str = "auto", seed: int | None = None) -> dict[str, Any]:
    """Fine-tune the (pruned) model in ``checkpoint`` for ``app``; writes a task model to ``out``.

    Returns:
        The training summary, also written to ``out/finetune.json``.
    """
    dev = resolve_device(device)
    encoder = load_model(checkpoint, device=dev)
    check_compatible(app, encoder.config.modalities)
    seed = app.finetune.seeds[0] if seed is None else seed
    norm = encoder.config.normalization
    train = open_app_store(app, chips, "train", encoder.config.modalities, norm)
    val = open_app_store(app, chips, "val", encoder.config.modalities, norm)
    origin = encoder.config.origin or {}
    model = _task_model(encoder, app, train.class_names or [], {
        "pruned_dir": str(Path(checkpoint).resolve()),
        "pretrained_dir": origin.get("pruned_from"),
        "seed": seed,
        "finetune": app.finetune.__dict__,
        "chips": str(Path(chips).resolve()),
        "chips_fingerprint": ChipStore.open(chips, in_memory=False).fingerprint(),
    }, seed)
    pruned = encoder.config.kept_experts is not None
    t0 = time.perf_counter()
    history = train_task(model, train, val, app.metric, app.finetune, seed, dev,
                         balance_weight=0.0 if pruned else encoder.config.balance_loss_weight)
    out = Path(out)
    save_task_model(model, out)
    summary = {"app": app.name, "metric": app.metric, "seed": seed, "parameters": model.num_parameters(),
               "history": history}
    tmp = out / "finetune.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))  # no timings in the file: re-running gives the same bytes
    os.replace(tmp, out / "finetune.json")
    return summary | {"seconds": round(time.perf_counter() - t0, 2)}


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
                 device: str = "auto", pretrained: str | Path | None = None) -> dict[str, Any]:
    """Compare pruned, unpruned and from-scratch models of ``app`` on the test split.

    Args:
        finetuned: a task model written by :func:`finetune_app` (the pruned variant).
        pretrained: the unpruned pre-trained model; default: the lineage in ``finetuned``.

    Returns:
        The report (also written to ``out``): ``metric`` and, per variant, ``value``, ``ci95``,
        ``params``, ``checkpoint_bytes``, ``latency_ms``.
    """
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

    def run(make: Any, balance: float) -> tuple[TaskModel, list[np.ndarray], np.ndarray, list[dict]]:
        outputs, hists, model, targets = [], [], None, None
        for s in seeds:
            model = make(s)
            hists.append(train_task(model, train, val, app.metric, app.finetune, s, dev, balance))
            o, targets = predict(model, test, app.finetune.batch_size, dev)
            outputs.append(o)
        return model, outputs, targets, hists

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
    classes = test.class_names or classes
    outputs, targets = [], None
    hists = [] if mismatch else [pruned_model_history(finetuned)]
    for s in seeds:
        if s == info.get("seed") and not mismatch:
            m = pruned_model
        else:
            m = _task_model(load_model(pruned_dir, device=dev), app, classes, {}, s)
            hists.append(train_task(m, train, val, app.metric, app.finetune, s, dev, 0.0))
        o, targets = predict(m, test, app.finetune.batch_size, dev)
        outputs.append(o)
    report["pruned"] = _variant_report(pruned_model, app, outputs, targets, test, dev, hists)

    unpruned, outs, tg, h = run(lambda s: _task_model(copy.deepcopy(full), app, classes, {}, s),
                                full.config.balance_loss_weight)
    report["unpruned"] = _variant_report(unpruned, app, outs, tg, test, dev, h)

    def scratch(s: int) -> TaskModel:
        torch.manual_seed(s)
        return _task_model(MapexModel(cfg, with_decoder=False).to(dev), app, classes, {}, s)

    scratch_model, outs, tg, h = run(scratch, 0.0)
    report["scratch"] = _variant_report(scratch_model, app, outs, tg, test, dev, h)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
    return report
