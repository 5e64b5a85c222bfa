#!/usr/bin/env bash
# scripts/train.sh [--config FILE] [--master URL] [--set KEY=VALUE ...] [--run-name NAME]
#                  [--resume RUN_DIR | --resume-if-exists]
# Set up (venv, Fashion-MNIST), ingest Fashion-MNIST into Delta when the table is missing, then run
# `spark-submit pipelines/train.py`. Without --master, spark-submit's own default applies and the
# job falls back to local[*]. The last line printed is the run's summary JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

train_args=()
cfg_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --master) SUBMIT_OPTS+=(--master "$2"); shift 2 ;;
    --master=*) SUBMIT_OPTS+=(--master "${1#--master=}"); shift ;;
    --config|--set) cfg_args+=("$1" "$2"); train_args+=("$1" "$2"); shift 2 ;;
    --run-name|--resume) train_args+=("$1" "$2"); shift 2 ;;
    *) train_args+=("$1"); shift ;;
  esac
done

ensure_java
ensure_venv

# The config decides the table and lake; ingest Fashion-MNIST only when that table is missing.
{ read -r table; read -r lake_path; } < <(python -m pipelines.config "${cfg_args[@]}" \
  data.table lake.path 2>/dev/null || printf -- '-\n-\n')
if [ "$table" = "fashion_mnist" ]; then
  ensure_fashion_mnist_table "$lake_path"
fi

spark_submit pipelines/train.py "${train_args[@]}"
