"""The only package that talks to MLflow.

* :mod:`~mapex_core.tracking.store`: which tracking store, and logging runs and models into it;
* :mod:`~mapex_core.tracking.registry`: registered models, versions, aliases and the promotion gate;
* :mod:`~mapex_core.tracking.served`: the pyfunc model that serving and ``mlflow.pyfunc`` load;
* :mod:`~mapex_core.tracking.artifacts`: runs read back (params, tags, JSON reports), the newest run with
  some tags, small sites logged and downloaded as run artifacts (the team dashboard).

The names below are the public API (``from mapex_core import tracking; tracking.configure()``).
``MapexPyfunc`` must stay importable from here: the registered versions' model code imports it so.
"""

from mapex_core.tracking.artifacts import (
    download_run_files,
    latest_run,
    log_files_run,
    registered_apps,
    run_record,
)
from mapex_core.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PRETRAINED_ALIAS,
    PRETRAINED_MODEL,
    apply_gate,
    download_task_model,
    log_pretrain,
    model_version_for,
    promote,
    register_app,
    registered_name,
    registry_history,
    registry_lock,
    registry_state,
    version_lineage,
)
from mapex_core.tracking.served import MapexPyfunc, task_contract
from mapex_core.tracking.store import (
    EXPERIMENT,
    TrackingError,
    configure,
    default_tracking_uri,
    pip_requirements,
    tracking_uri,
    ui_base_url,
)

__all__ = ["CHALLENGER", "CHAMPION", "EXPERIMENT", "PRETRAINED_ALIAS", "PRETRAINED_MODEL", "MapexPyfunc",
           "TrackingError", "apply_gate", "configure", "default_tracking_uri", "download_run_files",
           "download_task_model", "latest_run", "log_files_run", "log_pretrain", "model_version_for",
           "pip_requirements", "promote", "register_app", "registered_apps", "registered_name", "registry_history",
           "registry_lock", "registry_state", "run_record", "task_contract", "tracking_uri", "ui_base_url",
           "version_lineage"]
