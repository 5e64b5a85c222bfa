#!/usr/bin/env bash
# scripts/cluster.sh start|stop|status
# A Spark standalone master and two workers on 127.0.0.1, from the pyspark installed in .venv (its
# bin/spark-class runs org.apache.spark.deploy.master.Master and ...worker.Worker; the pip package
# has no sbin/start-*.sh). PIDs and logs go to the state directory; stop ends exactly those PIDs.
#
# Settings (environment): FEDSPARK_CLUSTER_DIR (state: pids, logs, worker dirs; default ./.cluster),
# FEDSPARK_MASTER_PORT (7077), FEDSPARK_MASTER_UI_PORT (8080; 0 = any free port),
# FEDSPARK_WORKER_CORES (1 each), FEDSPARK_WORKER_MEMORY (3g each).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

STATE="${FEDSPARK_CLUSTER_DIR:-$ROOT/.cluster}"
PORT="${FEDSPARK_MASTER_PORT:-7077}"
UI_PORT="${FEDSPARK_MASTER_UI_PORT:-8080}"
CORES="${FEDSPARK_WORKER_CORES:-1}"
MEMORY="${FEDSPARK_WORKER_MEMORY:-3g}"
MASTER_URL="spark://127.0.0.1:$PORT"
NAMES=(master worker-1 worker-2)

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

launch() {  # name, class, args...: run spark-class in the background, its PID in <name>.pid
  local name="$1"; shift
  if alive "$name"; then
    say "$name already running (pid $(cat "$STATE/$name.pid"))"
    return
  fi
  # spark-class ends in `exec java ...`, so $! is the JVM's own PID
  SPARK_LOG_DIR="$STATE/logs" nohup "$VENV/bin/spark-class" "$@" >"$STATE/logs/$name.out" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

registered_workers() {
  grep -c "Registering worker" "$STATE/logs/master.out" 2>/dev/null || true
}

start() {
  ensure_java
  ensure_venv
  mkdir -p "$STATE/logs"
  : >"$STATE/logs/master.out.new" && mv "$STATE/logs/master.out.new" "$STATE/logs/master.out"
  launch master org.apache.spark.deploy.master.Master --host 127.0.0.1 --port "$PORT" \
    --webui-port "$UI_PORT"
  for i in 1 2; do
    mkdir -p "$STATE/worker-$i"
    # a worker of its own: its own work dir (executors' files, shipped archives) and no web UI port
    # clash (0 = any free port)
    launch "worker-$i" org.apache.spark.deploy.worker.Worker "$MASTER_URL" --host 127.0.0.1 \
      --cores "$CORES" --memory "$MEMORY" --work-dir "$STATE/worker-$i" --webui-port 0
  done
  for _ in $(seq 1 120); do
    if [ "$(registered_workers)" -ge 2 ]; then
      say "cluster up: $MASTER_URL, 2 workers (logs in $STATE/logs)"
      echo "$MASTER_URL"
      return
    fi
    for name in "${NAMES[@]}"; do
      alive "$name" || { say "$name exited; see $STATE/logs/$name.out"; stop; exit 1; }
    done
    sleep 0.5
  done
  say "workers did not register within 60 s; see $STATE/logs"
  stop
  exit 1
}

stop() {
  for name in worker-2 worker-1 master; do
    [ -f "$STATE/$name.pid" ] || continue
    local pid
    pid="$(cat "$STATE/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      say "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/$name.pid"
  done
}

status() {
  local up=0
  for name in "${NAMES[@]}"; do
    if alive "$name"; then
      echo "$name running (pid $(cat "$STATE/$name.pid"))"
      up=$((up + 1))
    else
      echo "$name stopped"
    fi
  done
  [ "$up" -eq 3 ] && echo "master $MASTER_URL" || return 3
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: scripts/cluster.sh start|stop|status" >&2; exit 2 ;;
esac
