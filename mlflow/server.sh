#!/usr/bin/env bash
# The MLflow tracking server and UI on this project's store (mlflow/mlflow.db, mlflow/artifacts),
# bound to 127.0.0.1 (MLFLOW_HOST / MLFLOW_PORT override; one worker suits a laptop).
#   bash mlflow/server.sh            # or: make mlflow-ui
#   then open http://127.0.0.1:5000, or point runs at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# A team's server (runs and registry in PostgreSQL, artifacts proxied to an S3 store, with Prefect):
# `make cluster-up` (README "Run it for a team").
set -euo pipefail
cd "$(dirname "$0")/.."
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
MLFLOW="${MLFLOW_BIN:-.venv/bin/mlflow}"
mkdir -p mlflow/artifacts
echo "MLflow UI on http://$HOST:$PORT (store sqlite:///$PWD/mlflow/mlflow.db); stop with Ctrl-C or kill -TERM" >&2
exec "$MLFLOW" server --backend-store-uri "sqlite:///$PWD/mlflow/mlflow.db" \
    --default-artifact-root "$PWD/mlflow/artifacts" --host "$HOST" --port "$PORT" --workers 1
