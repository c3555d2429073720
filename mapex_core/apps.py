"""The applications registry: which teams get a pruned model, from which sensors, for what task.

Applications live in ``params.yaml`` under ``applications:`` (a mapping name -> settings), or
in a standalone YAML file passed as ``--app path/to/app.yaml``. Such a file needs only
``name``, ``modalities``, ``task`` and ``metric``; everything else has a default and the labels
come from the chip store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mapex_core.gate import GateParams
from mapex_core.metrics import METRICS
from mapex_core.modalities import MODALITIES
from mapex_core.names import NAME, check_name
from mapex_core.params import load_params
from mapex_core.pruning import PruneParams
from mapex_core.tasks import TASKS

# What an application's evaluation compares (mapex_core.training.evaluate), in this order: the pruned
# model (registered), the unpruned pre-trained model and the pruned architecture trained from scratch.
VARIANTS = ("pruned", "unpruned", "scratch")


@dataclass
class FinetuneParams:
    """Fine-tuning budget of an application (the same for every variant it is compared with)."""

    mode: str = "full"  # "full" fine-tuning or "linear" probe (encoder frozen)
    steps: int = 150
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    label_fraction: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_every: int = 25
    patience: int = 4
    head_channels: int = 64
    bootstrap: int = 1000
    latency_runs: int = 20

    def __post_init__(self) -> None:
        if self.mode not in ("full", "linear"):
            raise ValueError(f"finetune.mode must be 'full' or 'linear', got {self.mode!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"finetune.label_fraction must be in (0, 1], got {self.label_fraction}")
        self.seeds = [int(s) for s in (self.seeds if isinstance(self.seeds, list) else [self.seeds])]


@dataclass
class Application:
    """One registered application."""

    name: str
    modalities: list[str]
    task: str
    metric: str
    chips: str | None = None
    description: str = ""
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    prune: PruneParams = field(default_factory=PruneParams)
    gate: GateParams = field(default_factory=GateParams)

    @property
    def label_type(self) -> str:
        """The chip store label type this task needs."""
        return TASKS[self.task].label_type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(name: str, raw: dict[str, Any], source: str) -> Application:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: application {name!r} must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    data["name"] = name
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{source}: application name {name!r} must match {NAME.pattern} "
                         "(it names registered models and folders)")
    required = ("modalities", "task", "metric")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{source}: application {name!r} lacks {missing}; required: {list(required)}")
    known = {f for f in Application.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: application {name!r} has unknown key(s) {unknown}; known: {sorted(known)}")
    mods = data["modalities"]
    if isinstance(mods, str) or not mods:
        raise ValueError(f"{source}: application {name!r}: modalities must be a non-empty list")
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ValueError(f"{source}: application {name!r}: unknown modalities {bad}; known: {sorted(MODALITIES)}")
    if data["task"] not in TASKS:
        raise ValueError(f"{source}: application {name!r}: unknown task {data['task']!r}; known: {sorted(TASKS)}")
    if data["metric"] not in METRICS:
        raise ValueError(f"{source}: application {name!r}: unknown metric {data['metric']!r}; known: {sorted(METRICS)}")
    if METRICS[data["metric"]] != data["task"]:
        raise ValueError(f"{source}: application {name!r}: metric {data['metric']!r} is for {METRICS[data['metric']]} "
                         f"tasks, not {data['task']}")
    try:
        data["finetune"] = FinetuneParams(**(data.get("finetune") or {}))
        data["prune"] = PruneParams(**(data.get("prune") or {}))
        data["gate"] = GateParams(**(data.get("gate") or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: application {name!r}: {exc}") from exc
    data["modalities"] = list(mods)
    return Application(**data)


def load_applications(params: str | Path | dict[str, Any] | None = "params.yaml") -> dict[str, Application]:
    """All applications of a params file (or an already loaded params dict).

    Applications come from its ``applications:`` section and, when a file
    ``applications.yaml`` (a mapping name -> settings) sits next to the params file, from that
    file too; a name defined in both is an error.
    """
    source = "params" if isinstance(params, dict) else str(params)
    data = params if isinstance(params, dict) else load_params(params)
    apps = dict(data.get("applications") or {})
    if not isinstance(data.get("applications") or {}, dict):
        raise ValueError(f"{source}: 'applications' must be a mapping name -> settings")
    out = {name: _build(name, raw, source) for name, raw in apps.items()}
    if not isinstance(params, dict) and params is not None:
        extra = Path(params).with_name("applications.yaml")
        if extra.is_file():
            more = load_params(extra)
            more = more.get("applications", more) if isinstance(more.get("applications"), dict) else more
            for name, raw in more.items():
                if name in out:
                    raise ValueError(f"{extra}: application {name!r} is also defined in {source}")
                out[name] = _build(name, raw, str(extra))
    return out


def get_application(name_or_path: str, params: str | Path | dict[str, Any] | None = "params.yaml") -> Application:
    """An application by name (from ``params``) or from a standalone YAML file.

    Raises:
        ValueError: unknown name (lists the registered ones) or an invalid definition.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        raw = load_params(p)
        if "name" not in raw:
            raise ValueError(f"{p}: an application file needs at least name, modalities, task and metric")
        raw = dict(raw)
        return _build(str(raw.pop("name")), raw, str(p))
    apps = load_applications(params)
    if name_or_path not in apps:
        check_name(name_or_path)  # a malformed name is named as such, not looked up
        raise ValueError(f"unknown application {name_or_path!r}; registered: {sorted(apps) or 'none'} "
                         "(or pass a path to an application YAML file)")
    return apps[name_or_path]


def check_compatible(app: Application, model_modalities: list[str], store_modalities: list[str] | None = None,
                     store_label_type: str | None = None, where: str = "",
                     class_names: list[str] | None = None) -> None:
    """Raise ``ValueError`` when the model or the chip store cannot serve ``app`` (lists what exists)."""
    lacking = [m for m in app.modalities if m not in model_modalities]
    if lacking:
        raise ValueError(f"application {app.name!r} needs modalities {lacking} that the pre-trained model lacks; "
                         f"the model takes {model_modalities}")
    if store_modalities is not None:
        lacking = [m for m in app.modalities if m not in store_modalities]
        if lacking:
            raise ValueError(f"{where}: chip store has no {lacking} chips for application {app.name!r}; "
                             f"it holds {store_modalities}")
    if store_label_type is not None and store_label_type != app.label_type:
        raise ValueError(f"{where}: application {app.name!r} ({app.task}) needs {app.label_type} labels, "
                         f"but the chip store has {store_label_type!r} labels")
    if class_names is not None and app.metric == "iou_water" and "water" not in class_names:
        raise ValueError(f"{where}: application {app.name!r} uses metric iou_water, but the chip store has no "
                         f"class named 'water'; classes: {class_names}")


def check_model_app(info: dict[str, Any], app: str, where: str | Path) -> None:
    """Refuse a task model (its ``task.json`` ``info``) that was made for another application than ``app``.

    Raises:
        ValueError: names the folder and both applications.
    """
    owner = info.get("app")
    if owner not in (None, app):
        raise ValueError(f"{where} is a model of application {owner!r}, not {app!r}")
