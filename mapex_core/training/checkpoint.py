"""Training checkpoints: weights, optimizer, scheduler and RNG state, all without pickle.

A checkpoint is a directory ``step_XXXXXXX/`` holding

* ``config.json`` + ``model.safetensors`` (a loadable model, see ``model.serialization``),
* ``optimizer.safetensors`` (every optimizer state tensor) + ``trainer.json`` (step, epoch,
  position in the epoch, scheduler state, optimizer hyper-parameters, loss history),
* ``rng.safetensors`` (torch CPU/CUDA RNG and the run's own generators).

It is written to a temporary directory and renamed, so a crash leaves the previous checkpoint
intact; ``latest`` names the newest complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mapex_core.io import atomic_write_text, replace_folder
from mapex_core.model.mapex import MapexModel
from mapex_core.model.serialization import load_model, save_model

LATEST = "latest"


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: MapexModel,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    generators: dict[str, torch.Generator],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXX`` atomically and prune old ones (keep ``keep``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        rng[f"gen.{name}"] = gen.get_state()
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    state = dict(trainer_state, step=step, optimizer=opt_meta)
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
    replace_folder(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer.json").is_file():
            return cand
    done = [p for p in sorted(root.glob("step_*")) if (p / "trainer.json").is_file()]
    return done[-1] if done else None


def checkpoint_matches(ckpt: str | Path, config: Any, params: Any) -> bool:
    """Whether checkpoint ``ckpt`` was written by a run of this model ``config`` (normalisation
    included) and these training ``params`` (a dataclass): the same run, continued after a crash."""
    from dataclasses import asdict

    try:
        saved_cfg = json.loads((Path(ckpt) / "config.json").read_text())
        state = json.loads((Path(ckpt) / "trainer.json").read_text())
    except (OSError, ValueError):
        return False
    same_config = json.loads(json.dumps(config.to_dict())) == saved_cfg
    return same_config and json.loads(json.dumps(asdict(params))) == state.get("params")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MapexModel, dict[str, Any]]:
    """Load a checkpoint's model and trainer state (step, epoch, history, optimizer metadata).

    Raises:
        ValueError: the checkpoint is incomplete or corrupt (names the file).
    """
    path = Path(path)
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint trainer.json: {exc}") from exc
    return load_model(path, device=device), state


def restore_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> None:
    """Restore optimizer and RNG state saved by :func:`save_checkpoint`.

    ``optimizer`` must have been built over the parameters of the model that
    :func:`load_checkpoint` returned.
    """
    path = Path(path)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    for name, gen in generators.items():
        if f"gen.{name}" in rng:
            gen.set_state(rng[f"gen.{name}"])
