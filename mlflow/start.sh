#!/usr/bin/env bash
# (Re)start the MLflow server (server.sh) in the background and return once it answers /health:
#   bash mlflow/start.sh ENV_FILE [LOG]
# cluster.yaml runs it on the head node, whose jobs log to it: a server that cannot start (no
# ENV_FILE, a wrong database host or password) must stop `ray up` with its reason rather than die
# unseen under nohup. Exits 1 with the end of LOG (default ~/mlflow-server.log) when the server
# exits or does not answer within MLFLOW_START_TIMEOUT_S seconds (default 120). A server this
# script started before (its process group, ~/mlflow-server.pid) is stopped first.
set -euo pipefail
env_file=${1:?usage: bash mlflow/start.sh ENV_FILE [LOG]}
log=${2:-$HOME/mlflow-server.log}
pid_file=$HOME/mlflow-server.pid
if [ ! -f "$env_file" ]; then
  echo "mlflow/start.sh: $env_file is missing: cp mlflow/cluster.env.example $env_file and put in your database host and bucket" >&2
  exit 1
fi
# the port the server will listen on: the environment's, else the file's, else MLflow's default
port=${MLFLOW_PORT:-$(sed -n 's/^MLFLOW_PORT=//p' "$env_file" | tail -n 1)}
port=${port:-5000}
old=$(cat "$pid_file" 2>/dev/null || true)
if [ -n "$old" ] && kill -0 -- "-$old" 2>/dev/null; then
  kill -- "-$old"
  while kill -0 -- "-$old" 2>/dev/null; do sleep 1; done
fi
setsid nohup bash "$(dirname "$0")/server.sh" "$env_file" > "$log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pid_file"
for _ in $(seq "${MLFLOW_START_TIMEOUT_S:-120}"); do
  if curl -fs --max-time 5 -o /dev/null "http://127.0.0.1:$port/health"; then
    echo "mlflow/start.sh: MLflow server answering on port $port (pid $pid, log $log)"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || { echo "mlflow/start.sh: the MLflow server exited; the end of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }
  sleep 1
done
echo "mlflow/start.sh: no answer from http://127.0.0.1:$port/health after ${MLFLOW_START_TIMEOUT_S:-120} s; the end of $log:" >&2
tail -n 20 "$log" >&2
kill -- "-$pid"
exit 1
