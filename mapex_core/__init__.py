"""MAPEX core library: sensors, model, data, training. No Prefect, no MLflow at import time."""

from mapex_core._env import apply_quiet_defaults

apply_quiet_defaults()

__version__ = "0.1.0"
