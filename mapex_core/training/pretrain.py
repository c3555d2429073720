"""Multi-modal masked-autoencoder pre-training of a MAPEX model on a chip store.

Outputs in ``out``: ``config.json`` + ``model.safetensors`` (final weights), ``metrics.json``
(loss curve, throughput, specialisation), ``loss.csv`` (the loss curve, for ``dvc plots``),
``routing_stats.json`` and ``checkpoints/``. The five final files are written aside and moved in
with ``config.json`` removed first and moved in last (:func:`mapex_core.io.merge_folder`): a folder
with a ``config.json`` holds one run's five files, never a mix (``checkpoints/`` has its own scheme).
Re-running with ``resume=True`` continues from the newest checkpoint and reproduces the
uninterrupted run: the batch order depends only on ``(seed, epoch)`` and every RNG is restored.

Data-parallel training (DDP, :mod:`mapex_core.training.distributed`): started by ``torchrun``
(``mapex pretrain --nproc N``), which sets ``WORLD_SIZE`` > 1, every process runs :func:`pretrain`;
the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl with one GPU per process on CUDA). Each step is
``world_size`` batches of ``batch_size`` chips, one per rank (see :func:`epoch_steps`), so a
step sees ``batch_size * world_size`` chips. All ranks of a step get batches of the same
presence group (same modalities, same chip size) and draw the modality dropout from identically
seeded generators, so every rank feeds the model the same modality set; the MAE masks are drawn
per rank (different seeds), since identical masks would hide the same patches on every rank.
Only rank 0 writes files; resume works when the number of processes is unchanged (each rank's
mask generator is saved in the checkpoint), and is refused with a ``ValueError`` otherwise.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mapex_core.data.dataset import ChipStore, ConcatStores, collate
from mapex_core.data.sampling import PresenceBatchSampler
from mapex_core.data.statistics import pooled_normalization
from mapex_core.io import (
    OutputConflict,
    atomic_write_json,
    atomic_write_text,
    check_output,
    folder_problem,
    merge_folder,
    staged_folder,
)
from mapex_core.model import MapexConfig, MapexModel, collect_routing_stats, save_model
from mapex_core.model.serialization import CONFIG_NAME
from mapex_core.training.checkpoint import (
    checkpoint_matches,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from mapex_core.training.distributed import (
    DistContext,
    epoch_steps,
    gather_generators,
    init_distributed,
    state_hash,
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

# what pre-training writes in its folder (.gitignore: DVC's, for the tracked files)
PRETRAIN_FILES = (CONFIG_NAME, "model.safetensors", "metrics.json", "loss.csv", "routing_stats.json",
                  "checkpoints", ".gitignore")


def check_out_folder(out: str | Path, force: bool = False) -> None:
    """Whether pre-training may write into ``out``: absent, empty, or holding only its own files
    (any folder with ``force``: its other files are kept).

    Raises:
        OutputConflict: ``out`` is a file, or holds other files and ``force`` is not given.
    """
    def problem(path: Path) -> str | None:
        debug = {p.name for p in path.glob("rank*.sha256")}
        return folder_problem(path, "a pre-training folder", {*PRETRAIN_FILES, *debug})

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputConflict(f"{out}: is a file, not a folder; pre-training writes a folder (with its checkpoints)")
    check_output(out, problem, force, hint="pass --force to write into it (its other files are kept)")


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
    resume: bool | None = False,
    overwrite: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Pre-train a MAPEX model with the multi-modal MAE objective.

    Run by ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this and they train one model
    data-parallel (see the module docstring); only rank 0 writes files.

    Args:
        chips: chip store path, or several (each contributes the model's modalities it holds;
            normalisation statistics are pooled over all of them and stored in the config).
        out: output directory (created).
        config: model architecture (its modalities must be in the store).
        params: training knobs; ``batch_size`` is per process.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: ``True``: continue from the newest checkpoint in ``out/checkpoints`` (starts
            fresh when there is none). ``None``: continue it only when it was written by a run of
            the same model, normalisation and params (a crashed run), else treat it as another
            run's. ``False``: never continue.
        overwrite: start over when ``out/checkpoints`` holds another run's checkpoints (they are
            deleted). Without it, another run's checkpoints are an error, so a forgotten flag
            never throws away training.
        on_step: progress callback ``(step, total, logs)``; ``logs["loss"]`` is the latest
            logged (``log_every``) mean loss, so the callback adds no host sync.
        force: write into an ``out`` that holds other files (they are kept); without it that is
            an error before any training.

    The model takes the configured modalities that the chip stores hold: a modality no store has
    is left out of the model (``metrics["modalities_dropped"]`` says which), not an error.

    Returns:
        The metrics dict also written to ``out/metrics.json`` (on every rank).
    """
    check_out_folder(out, force)
    ddp, dev = init_distributed(device)
    try:
        return _pretrain(chips, Path(out), config, params, ddp, dev, resume, overwrite, on_step, force)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _pretrain(
    chips: str | Path | list[str | Path],
    out: Path,
    config: MapexConfig,
    params: PretrainParams,
    ddp: DistContext,
    dev: torch.device,
    resume: bool | None,
    overwrite: bool,
    on_step: Callable[[int, int, dict[str, float]], None] | None,
    force: bool,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    stores = open_stores(chips, config, list(params.splits))
    held = {m for s in stores for m in s.modalities}
    dropped = [m for m in config.modalities if m not in held]
    if dropped:  # pre-train on what the chips hold: the model has no embedding or experts for the rest
        config = MapexConfig.from_dict({**config.to_dict(), "modalities": [m for m in config.modalities
                                                                           if m in held]})
    if config.normalization is None:
        config = MapexConfig.from_dict({**config.to_dict(), "normalization": pooled_normalization(stores)})
    missing = [m for m in config.modalities if m not in config.normalization]
    if missing:
        raise ValueError(f"no normalisation statistics for modalities {missing} in the model config; "
                         f"the chips hold {sorted(held)}")
    store = ConcatStores([ChipStore.open(s.path, modalities=s.modalities, split=list(params.splits),
                                         normalization=config.normalization) for s in stores])
    if len(store) == 0:
        raise ValueError(f"{chips}: no chips in split(s) {list(params.splits)} with modalities {config.modalities}")

    torch.manual_seed(params.seed)
    # the mask differs per rank (rank 0 draws exactly what a single process draws); the modality
    # dropout is the same on every rank, so all ranks run the model on the same modalities
    mask_gen = torch.Generator(device=dev).manual_seed(params.seed + 1 + 1_000_003 * ddp.rank)
    drop_gen = torch.Generator().manual_seed(params.seed + 2)
    mask_key = "mask" if ddp.rank == 0 else f"mask.rank{ddp.rank}"
    generators = {mask_key: mask_gen, "drop": drop_gen}
    history: dict[str, list[float]] = {"steps": [], "loss": [], "recon_loss": [], "aux_loss": [], "lr": []}
    step, epoch, pos, train_time, tokens_seen, samples_seen = 0, 0, 0, 0.0, 0, 0

    ckpt = latest_checkpoint(ckpt_root)
    if resume is None:  # continue a crashed run of these settings, and only that
        resume = ckpt is not None and checkpoint_matches(ckpt, config, params)
    if ckpt is not None and not resume:
        if not overwrite:
            raise ValueError(f"{ckpt_root} holds checkpoints of an earlier run (newest: {ckpt.name}); "
                             "pass --resume to continue it or --overwrite to start over")
        ddp.barrier()  # every rank has looked before rank 0 deletes
        if ddp.is_main:
            shutil.rmtree(ckpt_root)
        ddp.barrier()
        ckpt = None
    if ckpt is not None:
        model, state = load_checkpoint(ckpt, device=dev)
        if model.config.to_dict() != config.to_dict():
            raise ValueError(f"{ckpt}: checkpoint config differs from the requested model config; "
                             "use the same params or a new --out")
        if state.get("world_size", 1) != ddp.world:
            raise ValueError(f"{ckpt}: written by a run of {state.get('world_size', 1)} process(es); resume it "
                             f"with the same number (--nproc {state.get('world_size', 1)}), not {ddp.world}")
        optimizer = build_optimizer(model, params)
        restore_training_state(ckpt, optimizer, generators, state)
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        history = state["history"]
        train_time, tokens_seen = state["train_time"], state["tokens_seen"]
        samples_seen = state["samples_seen"]
    else:
        model = MapexModel(config).to(dev)
        optimizer = build_optimizer(model, params)
    net: torch.nn.Module = model
    if ddp.enabled:
        # experts nobody routed to and the patch embeddings of dropped modalities get no gradient
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
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
        # the mean over ranks (a resumed ``acc`` holds that mean on every rank: it stays the mean)
        total = acc
        if ddp.enabled:
            total = acc.clone()
            dist.all_reduce(total)
            total /= ddp.world
        vals = total.tolist()
        if not all(math.isfinite(v) for v in vals):
            raise FloatingPointError(f"non-finite loss before step {where}; lower pretrain.lr")
        return vals

    t_mark = time.perf_counter()
    while step < params.steps:
        steps = epoch_steps(sampler, epoch, ddp.world)[pos:]
        loader = DataLoader(store, batch_sampler=[s[ddp.rank] for s in steps], collate_fn=collate,
                            num_workers=params.num_workers)
        for i, batch in enumerate(loader):
            inputs = {m: batch[m].to(dev, non_blocking=True) for m in config.modalities if m in batch}
            inputs = drop_modalities(inputs, config.modalities, params.modality_dropout, drop_gen)
            if autocast is not None:
                with autocast:
                    res = net(inputs, generator=mask_gen)
            else:
                res = net(inputs, generator=mask_gen)
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
            # global counts: every rank knows the step's batches and modalities (same on all ranks)
            n_step = sum(len(b) for b in steps[i])
            samples_seen += n_step
            tokens_seen += n_step * sum((x.shape[-2] // config.patch_size) * (x.shape[-1] // config.patch_size)
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
                         "acc": pending, "acc_n": acc_n, "world_size": ddp.world}
                saved_gens = gather_generators(generators, mask_gen, ddp, dev)
                if ddp.is_main:
                    save_checkpoint(ckpt_root, step, model, optimizer, state, saved_gens, params.keep_checkpoints)
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

    if os.environ.get("MAPEX_DDP_DEBUG_HASH") == "1":  # each rank's final weights, to compare replicas
        atomic_write_text(out / f"rank{ddp.rank}.sha256", state_hash(model) + "\n")
    metrics: dict[str, Any] = {}
    if ddp.is_main:
        with staged_folder(out) as final:
            metrics = _write_final_outputs(final, model, store, dev, params, history, tokens_seen, samples_seen,
                                           train_time, ddp.world, dropped)
            check_out_folder(out, force)  # again: something may have appeared while training
            merge_folder(final, out, marker=CONFIG_NAME)
    if ddp.enabled:  # the other ranks wait here for rank 0's files, and get its metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _write_final_outputs(final: Path, model: MapexModel, store: ConcatStores, dev: torch.device,
                         params: PretrainParams, history: dict[str, list[float]], tokens_seen: int,
                         samples_seen: int, train_time: float, world: int, dropped: list[str]) -> dict[str, Any]:
    """Write the five final files of a run into the (staging) folder ``final``; returns the metrics."""
    save_model(model, final)
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
        "world_size": world,
        "num_chips": len(store),
        "parameters": model.num_parameters(),
        "specialisation": routing["specialisation"],
        "specialisation_per_layer": routing["specialisation_per_layer"],
    }
    if dropped:
        metrics["modalities_dropped"] = dropped
    atomic_write_json(final / "metrics.json", metrics)
    atomic_write_json(final / "routing_stats.json", routing)
    _write_loss_csv(final / "loss.csv", history)
    return metrics


def _write_loss_csv(path: Path, history: dict[str, list[float]]) -> None:
    """The logged loss curve as ``step,loss,recon_loss,aux_loss,lr`` rows (a ``dvc plots`` source)."""
    rows = ["step,loss,recon_loss,aux_loss,lr"]
    rows += [f"{s},{lo!r},{re_!r},{au!r},{lr!r}" for s, lo, re_, au, lr in zip(
        history["steps"], history["loss"], history["recon_loss"], history["aux_loss"], history["lr"], strict=True)]
    atomic_write_text(path, "\n".join(rows) + "\n")
