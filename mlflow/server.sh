#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API + model registry + artifact proxy).
#   bash mlflow/server.sh [ENV_FILE] [extra `mlflow server` flags]
# ENV_FILE defaults to mlflow/local.env (sqlite store + artifact root in the current directory);
# mlflow/cluster.env (from cluster.env.example) is the PostgreSQL + S3 set-up. MLFLOW_* variables
# already in the environment win over the file; PYTHON picks the interpreter (default: python3).
set -euo pipefail
env_file=${1:-$(dirname "$0")/local.env}
shift $(( $# > 0 ? 1 : 0 ))
exec "${PYTHON:-python3}" -m mlflow --env-file "$env_file" server "$@"
