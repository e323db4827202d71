#!/usr/bin/env bash
# Start, or restart, the MLflow tracking server of a Ray cluster, on its head node.
#
#   bash cluster/mlflow_server.sh ARTIFACTS_DESTINATION [PORT]      (cluster/*.yaml runs it before `ray start`)
#
# ARTIFACTS_DESTINATION: s3://BUCKET/prefix or gs://BUCKET/prefix; the server proxies artifact uploads there, so
# only the head needs object-store credentials for them. PORT: 5000 by default.
# The server binds to this node's private address (the one Ray advertises, ray.util.get_node_ip_address): the
# workers reach it inside the cluster network, you reach it through an SSH tunnel; it is never bound to
# 0.0.0.0, and a public address is refused.
# Environment: MLFLOW_SERVER_HOME (default ~/mlflow) holds the sqlite store, the log, the pid and the file
# tracking_uri that `ray start` exports as MLFLOW_TRACKING_URI; MLFLOW_BACKEND_STORE_URI replaces the sqlite
# store: on the cluster the PostgreSQL of cluster/postgres.sh (postgresql://ser@127.0.0.1:5432/mlflow, its password
# in PGPASSFILE), or a managed database (RDS, Cloud SQL) that outlives the head.
set -euo pipefail

artifacts="${1:?usage: mlflow_server.sh ARTIFACTS_DESTINATION [PORT]}"
port="${2:-5000}"
state="${MLFLOW_SERVER_HOME:-$HOME/mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}"
mkdir -p "$state"
rm -f "$state/tracking_uri"

# The previous server was started in its own session: stop its whole process group (uvicorn workers and the
# job consumers MLflow forks along with it), and only if that pid still is an MLflow process.
if [ -f "$state/server.pid" ]; then
  old=$(cat "$state/server.pid")
  if grep -qa mlflow "/proc/$old/cmdline" 2>/dev/null; then
    kill -- "-$old" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$old" 2>/dev/null || break; sleep 1; done
    kill -9 -- "-$old" 2>/dev/null || true
  fi
fi

host=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')
python - "$host" <<'EOF'
import ipaddress, sys
address = ipaddress.ip_address(sys.argv[1])
if address.is_unspecified or address.is_loopback or not address.is_private:
    sys.exit(f"refusing to bind MLflow to {address}: expected this node's private address")
EOF

# MLflow 3 answers 403 "Invalid Host header" to a Host it does not list (DNS-rebinding protection; by default
# localhost and some private ranges): list the address the workers use and the SSH tunnel's loopback end.
allowed="$host,$host:$port,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
setsid nohup mlflow server --host "$host" --port "$port" --allowed-hosts "$allowed" --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" --workers 2 > "$state/server.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$state/server.pid"

uri="http://$host:$port"
check='import sys; from ser_platform.tracking import check_tracking_server; check_tracking_server(sys.argv[1])'
for _ in $(seq 90); do
  if python -c "$check" "$uri" 2> /dev/null; then
    echo "$uri" > "$state/tracking_uri"
    echo "MLflow tracking server: $uri (log: $state/server.log)"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 2
done
echo "MLflow tracking server did not answer at $uri/health; last lines of $state/server.log:" >&2
tail -n 30 "$state/server.log" >&2
exit 1
