"""Multi-modal masked-autoencoder pre-training of a MAPEX model on a chip store.

Outputs in ``out``: ``config.json`` + ``model.safetensors`` (final weights), ``metrics.json``
(loss curve, throughput, specialisation), ``routing_stats.json`` and ``checkpoints/``.
Re-running with ``resume=True`` continues from the newest checkpoint and reproduces the
uninterrupted run: the batch order depends only on ``(seed, epoch)`` and every RNG is restored.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mapex_core.data.chips import (
    ChipStore,
    ConcatStores,
    PresenceBatchSampler,
    collate,
    pooled_normalization,
)
from mapex_core.model import MapexConfig, MapexModel, collect_routing_stats, save_model
from mapex_core.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)


@dataclass
class PretrainParams:
    """Knobs of a pre-training run (the ``pretrain`` section of ``params.yaml``)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    modality_dropout: float = 0.25
    splits: tuple[str, ...] = ("train",)
    num_workers: int = 0
    stats_batches: int = 50


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: MapexModel, p: PretrainParams) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, embeddings and routing biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed" in name or "mask_token" in name or name.endswith("modality_bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95))


def drop_modalities(batch: dict[str, torch.Tensor], modalities: list[str], prob: float,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """With probability ``prob``, keep a random non-empty proper subset of the present modalities.

    Teaches the encoder to work on any subset (what single-modality applications feed it).
    """
    present = [m for m in modalities if m in batch]
    draw = torch.rand(2, generator=gen)
    if len(present) < 2 or float(draw[0]) >= prob:
        return {m: batch[m] for m in present}
    n_keep = 1 + int(float(draw[1]) * (len(present) - 1))  # 1 .. len-1
    order = torch.randperm(len(present), generator=gen)[:n_keep].tolist()
    return {present[i]: batch[present[i]] for i in sorted(order)}


def routing_summary(model: MapexModel, store: ChipStore | ConcatStores, device: torch.device, batch_size: int,
                    max_batches: int) -> dict[str, Any]:
    """Routing statistics of ``model`` over (up to ``max_batches`` of) ``store``, unmasked."""
    model.eval()
    sampler = PresenceBatchSampler(store, batch_size, seed=0, drop_last=False)
    with torch.no_grad(), collect_routing_stats(model) as stats:
        for i, idx in enumerate(sampler.batches(0)):
            if i >= max_batches:
                break
            batch = collate([store[j] for j in idx])
            model.encode({m: batch[m].to(device) for m in model.config.modalities if m in batch})
    model.train()
    return stats.to_dict() | {"specialisation_per_layer": stats.specialisation_per_layer()}


def open_stores(chips: str | Path | list[str | Path], config: MapexConfig, splits: list[str]) -> list[ChipStore]:
    """Open every chip store with the model's modalities it holds.

    Raises:
        ValueError: a store holds none of the model's modalities.
    """
    paths = [chips] if isinstance(chips, str | Path) else list(chips)
    stores = []
    for p in paths:
        probe = ChipStore.open(p, split=splits, in_memory=False)
        mods = [m for m in config.modalities if m in probe.stored_modalities]
        if not mods:
            raise ValueError(f"{p}: holds {probe.stored_modalities}, none of the model's modalities {config.modalities}")
        stores.append(ChipStore.open(p, modalities=mods, split=splits))
    return stores


def pretrain(
    chips: str | Path | list[str | Path],
    out: str | Path,
    config: MapexConfig,
    params: PretrainParams,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Pre-train a MAPEX model with the multi-modal MAE objective.

    Args:
        chips: chip store path, or several (each contributes the model's modalities it holds;
            normalisation statistics are pooled over all of them and stored in the config).
        out: output directory (created).
        config: model architecture (its modalities must be in the store).
        params: training knobs.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from the newest checkpoint in ``out/checkpoints`` (starts fresh when
            there is none).
        overwrite: start over even if ``out/checkpoints`` holds an earlier run (deletes it).
            Without ``resume`` or ``overwrite``, an earlier run's checkpoints are an error, so
            a forgotten flag never throws away training.
        on_step: progress callback ``(step, total, logs)``; ``logs["loss"]`` is the latest
            logged (``log_every``) mean loss, so the callback adds no host sync.

    Returns:
        The metrics dict also written to ``out/metrics.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    dev = resolve_device(device)
    stores = open_stores(chips, config, list(params.splits))
    if config.normalization is None:
        config = MapexConfig.from_dict({**config.to_dict(), "normalization": pooled_normalization(stores)})
    missing = [m for m in config.modalities if m not in config.normalization]
    if missing:
        raise ValueError(f"no chips of modalities {missing} in {chips}; the model takes {config.modalities}")
    store = ConcatStores([ChipStore.open(s.path, modalities=s.modalities, split=list(params.splits),
                                         normalization=config.normalization) for s in stores])
    if len(store) == 0:
        raise ValueError(f"{chips}: no chips in split(s) {list(params.splits)} with modalities {config.modalities}")

    torch.manual_seed(params.seed)
    mask_gen = torch.Generator(device=dev).manual_seed(params.seed + 1)
    drop_gen = torch.Generator().manual_seed(params.seed + 2)
    generators = {"mask": mask_gen, "drop": drop_gen}
    history: dict[str, list[float]] = {"steps": [], "loss": [], "recon_loss": [], "aux_loss": [], "lr": []}
    step, epoch, pos, train_time, tokens_seen, samples_seen = 0, 0, 0, 0.0, 0, 0

    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None and not resume:
        if not overwrite:
            raise ValueError(f"{ckpt_root} holds checkpoints of an earlier run (newest: {ckpt.name}); "
                             "pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(ckpt_root)
        ckpt = None
    if ckpt is not None:
        model, state = load_checkpoint(ckpt, device=dev)
        if model.config.to_dict() != config.to_dict():
            raise ValueError(f"{ckpt}: checkpoint config differs from the requested model config; "
                             "use the same params or a new --out")
        optimizer = build_optimizer(model, params)
        restore_training_state(ckpt, optimizer, generators, state)
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        history = state["history"]
        train_time, tokens_seen = state["train_time"], state["tokens_seen"]
        samples_seen = state["samples_seen"]
    else:
        model = MapexModel(config).to(dev)
        optimizer = build_optimizer(model, params)
    sampler = PresenceBatchSampler(store, params.batch_size, seed=params.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
    model.train()
    # running sums of (loss, recon_loss, aux_loss) stay on the device: reading them back is a
    # host sync, done only when logging or checkpointing
    acc = torch.zeros(3, device=dev, dtype=torch.float64)
    acc_n = 0
    if ckpt is not None:
        acc += torch.tensor(state.get("acc", [0.0, 0.0, 0.0]), device=dev, dtype=torch.float64)
        acc_n = int(state.get("acc_n", 0))
    last_loss = history["loss"][-1] if history["loss"] else float("nan")

    def check_finite(where: int) -> list[float]:
        vals = acc.tolist()
        if not all(math.isfinite(v) for v in vals):
            raise FloatingPointError(f"non-finite loss before step {where}; lower pretrain.lr")
        return vals

    t_mark = time.perf_counter()
    while step < params.steps:
        batches = sampler.batches(epoch)[pos:]
        loader = DataLoader(store, batch_sampler=batches, collate_fn=collate,
                            num_workers=params.num_workers)
        for batch in loader:
            inputs = {m: batch[m].to(dev, non_blocking=True) for m in config.modalities if m in batch}
            inputs = drop_modalities(inputs, config.modalities, params.modality_dropout, drop_gen)
            if autocast is not None:
                with autocast:
                    res = model(inputs, generator=mask_gen)
            else:
                res = model(inputs, generator=mask_gen)
            optimizer.zero_grad(set_to_none=True)
            res.loss.backward()
            lr = params.lr * lr_factor(step, params.warmup_steps, params.steps, params.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            acc += torch.stack([res.loss.detach(), res.recon_loss.detach(), res.aux_loss.detach()]).double()
            acc_n += 1
            samples_seen += next(iter(inputs.values())).shape[0]
            tokens_seen += sum(x.shape[0] * (x.shape[-2] // config.patch_size) * (x.shape[-1] // config.patch_size)
                               for x in inputs.values())
            step, pos = step + 1, pos + 1
            is_log = step % params.log_every == 0 or step == params.steps
            is_ckpt = step % params.ckpt_every == 0 or step == params.steps
            if is_log:
                vals = check_finite(step)  # syncs: the time below includes all queued work
                history["steps"].append(step)
                for k, v in zip(("loss", "recon_loss", "aux_loss"), vals, strict=True):
                    history[k].append(v / acc_n)
                history["lr"].append(lr)
                last_loss = history["loss"][-1]
                acc.zero_()
                acc_n = 0
            if is_ckpt:
                pending = check_finite(step)
                train_time += time.perf_counter() - t_mark
                state = {"epoch": epoch, "pos": pos, "history": history, "train_time": train_time,
                         "tokens_seen": tokens_seen, "samples_seen": samples_seen, "params": asdict(params),
                         "acc": pending, "acc_n": acc_n}
                save_checkpoint(ckpt_root, step, model, optimizer, state, generators, params.keep_checkpoints)
                t_mark = time.perf_counter()
            elif is_log:
                now = time.perf_counter()
                train_time += now - t_mark
                t_mark = now
            if on_step is not None:
                on_step(step, params.steps, {"loss": last_loss, "lr": lr})
            if step >= params.steps:
                break
        else:
            epoch, pos = epoch + 1, 0

    save_model(model, out)
    routing = routing_summary(model, store, dev, params.batch_size, params.stats_batches)
    metrics = {
        "steps": history["steps"],
        "loss": history["loss"],
        "recon_loss": history["recon_loss"],
        "aux_loss": history["aux_loss"],
        "lr": history["lr"],
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "tokens_per_s": tokens_seen / train_time if train_time else 0.0,
        "samples_per_s": samples_seen / train_time if train_time else 0.0,
        "samples_seen": samples_seen,
        "train_seconds": train_time,
        "device": str(dev),
        "num_chips": len(store),
        "parameters": model.num_parameters(),
        "specialisation": routing["specialisation"],
        "specialisation_per_layer": routing["specialisation_per_layer"],
    }
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "routing_stats.json", routing)
    return metrics


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
