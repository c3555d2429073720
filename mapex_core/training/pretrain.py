"""Multi-modal masked-autoencoder pre-training of a MAPEX model on a chip store.

Outputs in ``out``: ``config.json`` + ``model.safetensors`` (final weights), ``metrics.json``
(loss curve, throughput, specialisation), ``loss.csv`` (the loss curve, for ``dvc plots``),
``routing_stats.json`` and ``checkpoints/``.
Re-running with ``resume=True`` continues from the newest checkpoint and reproduces the
uninterrupted run: the batch order depends only on ``(seed, epoch)`` and every RNG is restored.

Data-parallel training (DDP): started by ``torchrun`` (``mapex pretrain --nproc N``), which sets
``WORLD_SIZE`` > 1, every process runs :func:`pretrain`; the model is wrapped in
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

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
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


@dataclass
class DistContext:
    """This process's place in a data-parallel run (``world == 1``: a plain single process)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # the process group was created here, so it is destroyed here

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> tuple[DistContext, torch.device]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), else run alone.

    The backend is gloo on CPU and nccl on CUDA, where rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``
    (whatever index ``device`` names). A process group created by the caller is used as is.

    Raises:
        ValueError: the device is unknown or unavailable, or there are fewer GPUs than processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(), dev
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"process LOCAL_RANK={local} needs GPU {local}, but only "
                             f"{torch.cuda.device_count()} are visible; lower --nproc")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    ctx = DistContext(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns)
    if not ctx.enabled and owns:
        dist.destroy_process_group()
        return DistContext(), dev
    return ctx, dev


def epoch_steps(sampler: PresenceBatchSampler, epoch: int, world: int) -> list[list[list[int]]]:
    """The optimisation steps of ``epoch``: each a list of ``world`` batches, one per rank.

    The batches are the sampler's seeded order (``batch_size`` chips each, per rank). Ranks of
    one step must feed the model the same modalities, so a step takes ``world`` consecutive
    batches *of one presence group*: walking the order, each group's batches queue up and form
    a step when ``world`` are waiting. A group's last, incomplete step is padded with that
    group's first batches of the epoch (as ``DistributedSampler`` pads), so no chip or group is
    dropped. With ``world == 1`` this is exactly the sampler's order, one batch per step.
    """
    batches = sampler.batches(epoch)
    if world == 1:
        return [[b] for b in batches]
    group_of = {i: g for g, idx in enumerate(sampler.groups) for i in idx}
    remaining = Counter(group_of[b[0]] for b in batches)
    seen: dict[int, list[list[int]]] = {}
    queued: dict[int, list[list[int]]] = {}
    steps: list[list[list[int]]] = []
    for b in batches:
        g = group_of[b[0]]
        seen.setdefault(g, []).append(b)
        queue = queued.setdefault(g, [])
        queue.append(b)
        remaining[g] -= 1
        if len(queue) == world or remaining[g] == 0:
            k = 0
            while len(queue) < world:
                queue.append(seen[g][k % len(seen[g])])
                k += 1
            steps.append(queue)
            queued[g] = []
    return steps


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every ``state_dict`` entry (debugging DDP replicas)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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

    Run by ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this and they train one model
    data-parallel (see the module docstring); only rank 0 writes files.

    Args:
        chips: chip store path, or several (each contributes the model's modalities it holds;
            normalisation statistics are pooled over all of them and stored in the config).
        out: output directory (created).
        config: model architecture (its modalities must be in the store).
        params: training knobs; ``batch_size`` is per process.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from the newest checkpoint in ``out/checkpoints`` (starts fresh when
            there is none).
        overwrite: start over even if ``out/checkpoints`` holds an earlier run (deletes it).
            Without ``resume`` or ``overwrite``, an earlier run's checkpoints are an error, so
            a forgotten flag never throws away training.
        on_step: progress callback ``(step, total, logs)``; ``logs["loss"]`` is the latest
            logged (``log_every``) mean loss, so the callback adds no host sync.

    Returns:
        The metrics dict also written to ``out/metrics.json`` (on every rank).
    """
    ddp, dev = init_distributed(device)
    try:
        return _pretrain(chips, Path(out), config, params, ddp, dev, resume, overwrite, on_step)
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
    resume: bool,
    overwrite: bool,
    on_step: Callable[[int, int, dict[str, float]], None] | None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
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
    # the mask differs per rank (rank 0 draws exactly what a single process draws); the modality
    # dropout is the same on every rank, so all ranks run the model on the same modalities
    mask_gen = torch.Generator(device=dev).manual_seed(params.seed + 1 + 1_000_003 * ddp.rank)
    drop_gen = torch.Generator().manual_seed(params.seed + 2)
    mask_key = "mask" if ddp.rank == 0 else f"mask.rank{ddp.rank}"
    generators = {mask_key: mask_gen, "drop": drop_gen}
    history: dict[str, list[float]] = {"steps": [], "loss": [], "recon_loss": [], "aux_loss": [], "lr": []}
    step, epoch, pos, train_time, tokens_seen, samples_seen = 0, 0, 0, 0.0, 0, 0

    ckpt = latest_checkpoint(ckpt_root)
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
                saved_gens = _gather_generators(generators, mask_gen, ddp, dev)
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
        _write_text(out / f"rank{ddp.rank}.sha256", state_hash(model) + "\n")
    metrics: dict[str, Any] = {}
    if ddp.is_main:
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
            "world_size": ddp.world,
            "num_chips": len(store),
            "parameters": model.num_parameters(),
            "specialisation": routing["specialisation"],
            "specialisation_per_layer": routing["specialisation_per_layer"],
        }
        _write_json(out / "metrics.json", metrics)
        _write_json(out / "routing_stats.json", routing)
        _write_loss_csv(out / "loss.csv", history)
    if ddp.enabled:  # the other ranks wait here for rank 0's files, and get its metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _gather_generators(generators: dict[str, torch.Generator], mask_gen: torch.Generator, ddp: DistContext,
                       dev: torch.device) -> dict[str, torch.Generator]:
    """The generators a checkpoint saves: on rank 0 its own plus every other rank's mask generator.

    A collective: every rank must call it.
    """
    if not ddp.enabled:
        return generators
    states: list[Any] = [None] * ddp.world
    dist.all_gather_object(states, mask_gen.get_state().cpu())
    out = dict(generators)
    for r in range(1, ddp.world):
        g = torch.Generator(device=dev)
        g.set_state(states[r])
        out[f"mask.rank{r}"] = g
    return out


def _write_loss_csv(path: Path, history: dict[str, list[float]]) -> None:
    """The logged loss curve as ``step,loss,recon_loss,aux_loss,lr`` rows (a ``dvc plots`` source)."""
    rows = ["step,loss,recon_loss,aux_loss,lr"]
    rows += [f"{s},{lo!r},{re_!r},{au!r},{lr!r}" for s, lo, re_, au, lr in zip(
        history["steps"], history["loss"], history["recon_loss"], history["aux_loss"], history["lr"], strict=True)]
    _write_text(path, "\n".join(rows) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2))
