"""Data-parallel pre-training (DDP): which process does what, and how steps are split over ranks.

``torchrun`` (``mapex pretrain --nproc N``, see :func:`torchrun_command`) starts N processes and
sets ``WORLD_SIZE``; each joins the process group (:func:`init_distributed`: gloo on CPU, nccl
with one GPU per process on CUDA). A step is ``world`` batches, one per rank, all of one presence
group (:func:`epoch_steps`), so every rank feeds the model the same modalities.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mapex_core.data.sampling import PresenceBatchSampler
from mapex_core.runtime import resolve_device


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

def gather_generators(generators: dict[str, torch.Generator], mask_gen: torch.Generator, ddp: DistContext,
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



def torchrun_command(argv: list[str], nproc: int, module: str = "mapex_core.cli") -> list[str]:
    """The command that re-runs the command line ``argv`` (less ``--nproc``) in ``nproc`` torchrun processes.

    Args:
        argv: the arguments after the program name (``sys.argv[1:]``).
        nproc: processes on this machine.
        module: the module ``torchrun`` runs with ``-m``.
    """
    keep: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            keep.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *keep]
