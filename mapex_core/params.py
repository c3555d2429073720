"""Pipeline parameters: ``params.yaml`` (the DVC params file) read into typed sections.

Sections used so far: ``model`` (:class:`~mapex_core.model.MapexConfig` fields), ``pretrain``
(:class:`~mapex_core.training.pretrain.PretrainParams` fields) and ``data``. An unknown key is an
error naming the file and the section, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read a params YAML file; ``None`` or a missing default file gives ``{}``.

    Raises:
        FileNotFoundError: an explicitly given file does not exist.
        ValueError: the file is not valid YAML or not a mapping.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def section(cls: type[T], params: dict[str, Any], name: str, source: str = "params",
            **overrides: Any) -> T:
    """Build dataclass ``cls`` from ``params[name]``, then apply non-``None`` ``overrides``.

    Raises:
        ValueError: unknown keys (names ``source``, the section and the valid keys).
    """
    values = dict(params.get(name) or {})
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} in section '{name}'; valid: {sorted(fields)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
