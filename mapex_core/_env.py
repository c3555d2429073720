"""Environment defaults applied before any heavy import: telemetry off, state kept local.

Each value is a default (``os.environ.setdefault``): an explicit setting by the user wins.
MLflow only honours ``DO_NOT_TRACK=true`` (not ``1``); Prefect and DVC accept it too.
"""

from __future__ import annotations

import os

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_quiet_defaults() -> None:
    """Switch off the telemetry of MLflow, Prefect, DVC and Great Expectations."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
