"""The promotion gate: when a new version of an application's model may become its champion.

Pure rules and their thresholds, no registry: :mod:`mapex_core.tracking.registry` reads the facts of
the candidate and the champion, calls :func:`gate_decision` and moves the aliases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class GateParams:
    """Promotion gate thresholds of an application (its ``gate`` section)."""

    tolerance: float = 0.01  # the candidate's metric may be this much below the champion's
    max_params: int | None = None  # largest parameter count of a champion
    max_latency_ms: float | None = None  # largest batch-1 latency of a champion


def gate_decision(gate: GateParams, candidate: dict[str, Any], champion: dict[str, Any] | None) -> tuple[bool, list[str]]:
    """Whether ``candidate`` may replace ``champion``, and why.

    Args:
        gate: the application's thresholds.
        candidate, champion: ``version``, ``metric``, ``value``, ``params``, ``latency_ms`` of each
            (``champion`` is ``None`` when there is none yet).

    Returns:
        ``(passed, reasons)``: one reason per rule that was checked.
    """
    reasons, ok = [], True
    if not math.isfinite(candidate["value"]):
        return False, [f"{candidate['metric']} is {candidate['value']}: not a finite value"]
    if champion is not None and not math.isfinite(champion["value"]):
        champion = None
        reasons.append("champion has no finite metric value: not compared")
    if champion is None:
        reasons = reasons or ["no champion yet"]
    elif champion["metric"] != candidate["metric"]:
        reasons.append(f"champion v{champion['version']} was measured with {champion['metric']}, "
                       f"not {candidate['metric']}: metric not compared")
    else:
        floor = champion["value"] - gate.tolerance
        passed = candidate["value"] >= floor
        ok &= passed
        reasons.append(f"{candidate['metric']} {candidate['value']:.4f} {'>=' if passed else '<'} champion "
                       f"v{champion['version']} {champion['value']:.4f} - tolerance {gate.tolerance}")
    if gate.max_params is not None:
        passed = candidate["params"] <= gate.max_params
        ok &= passed
        reasons.append(f"parameters {candidate['params']} {'<=' if passed else '>'} max {gate.max_params}")
    if gate.max_latency_ms is not None:
        passed = candidate["latency_ms"] <= gate.max_latency_ms
        ok &= passed
        reasons.append(f"latency {candidate['latency_ms']:.2f} ms {'<=' if passed else '>'} max {gate.max_latency_ms} ms")
    return ok, reasons
