"""Fine-tuning of per-application models.

``finetune_app`` puts a task head on the (pruned) pre-trained encoder and trains it (and, in
``full`` mode, the encoder) on the application's chips, with early stopping on the validation
split; :func:`train_task` is the loop, shared with evaluation
(:mod:`mapex_core.training.evaluate`), which trains its comparison models the same way. What the
loss and the metric inputs are comes from the task's :class:`~mapex_core.tasks.TaskSpec`.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapex_core.apps import Application, FinetuneParams, check_compatible
from mapex_core.data.dataset import ChipStore, collate
from mapex_core.io import atomic_write_json, check_output, replace_folder, staged_folder
from mapex_core.metrics import summarize
from mapex_core.model import MapexModel, load_model
from mapex_core.model.heads import TaskModel, save_task_model, strip_decoder
from mapex_core.model.serialization import model_folder_problem
from mapex_core.runtime import resolve_device

StepCallback = Callable[[int, int, dict[str, Any]], None]  # (step, total steps, info)
# torch's global RNG initialises new heads and encoders; runs that train concurrently in threads
# (evaluation) take this lock around seeding and building, so each gets its seed's weights
RNG_LOCK = threading.RLock()


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


def inputs_of(batch: dict[str, Any], modalities: list[str], dev: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs of a collated batch: its tensors of ``modalities``, on ``dev``."""
    return {m: batch[m].to(dev) for m in modalities if m in batch}


@torch.no_grad()
def predict(model: TaskModel, store: ChipStore, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Outputs in the form :mod:`mapex_core.metrics` expects, and the targets, over a whole store (store order)."""
    model.eval()
    outs, tgts, order = [], [], []
    for idx in _batches(store, list(range(len(store))), batch_size, None):
        batch = collate([store[i] for i in idx])
        logits = model(inputs_of(batch, model.modalities, device)).float().cpu()
        out, tgt = model.spec.metric_inputs(logits, batch["labels"], len(model.class_names))
        outs.append(out)
        tgts.append(tgt)
        order.extend(idx)
    inv = np.argsort(order)
    return np.concatenate(outs)[inv], np.concatenate(tgts)[inv]


def validation_score(model: TaskModel, store: ChipStore, metric: str, batch_size: int, device: torch.device) -> float:
    """The metric of ``model`` on ``store`` (no interval)."""
    out, tgt = predict(model, store, batch_size, device)
    return summarize(metric, model.class_names, [out], tgt, n_boot=0)["value"]


def train_task(model: TaskModel, train: ChipStore, val: ChipStore | None, metric: str, p: FinetuneParams,
               seed: int, device: torch.device, balance_weight: float = 0.0,
               on_step: StepCallback | None = None, subset: list[int] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place; the best validation state is restored at the end.

    With ``p.mode == "linear"`` (a linear probe) the encoder is frozen (no gradient, eval mode) and
    only the task head is trained. The training chips are ``p.label_fraction`` of ``train`` drawn by
    ``seed`` (at least one), or exactly ``subset``.

    Args:
        balance_weight: weight of the routers' balance loss (0 after pruning).
        on_step: progress callback ``(step, total, {"loss": latest logged mean loss})``.
        subset: positions in ``train`` to train on instead of a ``label_fraction`` draw (e.g. a k-shot set).

    Returns:
        The history: ``steps``, ``train_loss`` and ``val`` at each evaluation, the best step and value.
    """
    with RNG_LOCK:
        torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(train)
    if n_train == 0:
        raise ValueError(f"{train.path}: no training chips for modalities {train.modalities}")
    keep = max(1, int(round(p.label_fraction * n_train)))
    drawn = sorted(torch.randperm(n_train, generator=gen)[:keep].tolist())  # drawn always: same batch order RNG
    if subset is not None:
        bad = [i for i in subset if not 0 <= i < n_train]
        if not subset or bad:
            raise ValueError(f"{train.path}: training subset must hold positions in [0, {n_train}) of the train "
                             f"split; got {len(subset)} position(s), out of range: {bad[:5]}")
    subset = sorted(set(subset)) if subset is not None else drawn
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
            logits, aux = model.forward_with_aux(inputs_of(batch, model.modalities, device))
            loss = model.spec.loss(logits, batch["labels"].to(device)) + balance_weight * aux
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
            if on_step is not None:
                on_step(step, p.steps, {"loss": history["train_loss"][-1] if history["train_loss"] else None})
            if step >= p.steps:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    has_val = val is not None and len(val) > 0
    history.update(best_step=best_step, best_val=best if has_val else None, early_stopping=has_val,
                   stopped_at=history["steps"][-1] if history["steps"] else step)
    return history


def task_model(encoder: MapexModel, app: Application, class_names: list[str], info: dict[str, Any],
                seed: int) -> TaskModel:
    """``encoder`` with a new task head, initialised from ``seed`` (the process's RNG is seeded randomly)."""
    torch.manual_seed(seed)
    return TaskModel(strip_decoder(encoder) if encoder.with_decoder else encoder, app.task, class_names,
                     info={"app": app.name, "metric": app.metric, **info},
                     head_channels=app.finetune.head_channels, input_modalities=app.modalities)


def finetune_app(app: Application, checkpoint: str | Path, chips: str | Path, out: str | Path,
                 device: str = "auto", seed: int | None = None, on_step: StepCallback | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Fine-tune the (pruned) model in ``checkpoint`` for ``app``; writes a task model to ``out``.

    The folder ``out`` is written whole (built aside, swapped into place): ``config.json``,
    ``task.json``, ``model.safetensors`` and ``finetune.json``.

    Args:
        seed: default: the application's first seed.
        on_step: progress callback ``(step, total, info)``.
        force: replace ``out`` even when it holds something that is not a MAPEX model folder.

    Returns:
        The training summary, also written to ``out/finetune.json``.

    Raises:
        OutputConflict: ``out`` holds other files (checked before any work), unless ``force``.
    """
    out = Path(out)
    check_output(out, model_folder_problem, force)
    dev = resolve_device(device)
    encoder = load_model(checkpoint, device=dev)
    check_compatible(app, encoder.config.modalities)
    seed = app.finetune.seeds[0] if seed is None else seed
    norm = encoder.config.normalization
    train = open_app_store(app, chips, "train", encoder.config.modalities, norm)
    val = open_app_store(app, chips, "val", encoder.config.modalities, norm)
    origin = encoder.config.origin or {}
    model = task_model(encoder, app, train.class_names or [], {
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
                         balance_weight=0.0 if pruned else encoder.config.balance_loss_weight, on_step=on_step)
    summary = {"app": app.name, "metric": app.metric, "seed": seed, "parameters": model.num_parameters(),
               "history": history}
    check_output(out, model_folder_problem, force)  # again: something may have appeared while training
    with staged_folder(out) as tmp:
        save_task_model(model, tmp)
        atomic_write_json(tmp / "finetune.json", summary)  # no timings in the file: re-running gives the same bytes
        replace_folder(tmp, out)
    return summary | {"seconds": round(time.perf_counter() - t0, 2)}

