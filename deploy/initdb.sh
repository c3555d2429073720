#!/bin/sh
# Run once by the postgres image on an empty data folder: MLflow's and Prefect's databases, and the
# login-only role whose advisory lock serialises registrations (it can read no table).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v lock_password="$LOCK_PASSWORD" <<'SQL'
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE ROLE mapex_lock LOGIN PASSWORD :'lock_password';
SQL
