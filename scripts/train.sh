#!/usr/bin/env bash
# scripts/train.sh [--config FILE] [--master URL] [--set KEY=VALUE ...] [--run-name NAME]
#                  [--resume RUN_DIR | --resume-if-exists]
# Set up (venv, Fashion-MNIST), ingest Fashion-MNIST into Delta when the table is missing, then run
# `fedspark train` (spark-submit pipelines/train.py with Delta set up). Without --master,
# spark-submit's own default applies and the job falls back to local[*]. With a master that is not
# local (spark://, yarn, k8s://), the code and a Python environment go with the job
# (scripts/package.sh: --py-files, --archives), so executors whose Python lacks the project run it.
# The last line printed is the run's summary JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

train_args=()
cfg_args=()
master=""
while [ $# -gt 0 ]; do
  case "$1" in
    --master) master="$2"; shift 2 ;;
    --master=*) master="${1#--master=}"; shift ;;
    --config|--set) cfg_args+=("$1" "$2"); train_args+=("$1" "$2"); shift 2 ;;
    --run-name|--resume) train_args+=("$1" "$2"); shift 2 ;;
    *) train_args+=("$1"); shift ;;
  esac
done

ensure_java
ensure_venv

if [ -n "$master" ]; then
  SUBMIT_OPTS+=(--master "$master")
  if [[ "$master" != local* ]]; then
    mapfile -t ship < <(bash "$ROOT/scripts/package.sh")
    SUBMIT_OPTS+=("${ship[@]}")
  fi
fi

# The config decides the table, the lake, whether Delta's jar comes from Maven and whether the
# model needs PyTorch; ingest
# Fashion-MNIST only when that table is missing.
{ read -r table; read -r lake_path; read -r delta_packages; read -r model_kind; } < <(python -m pipelines.core.config \
  "${cfg_args[@]}" data.table lake.path spark.delta_packages model.kind 2>/dev/null || printf -- '-\n-\nauto\n-\n')
if [ "$model_kind" = "torch" ]; then   # the optional extra of that name: only a torch job installs it
  ensure_extra torch
fi
export FEDSPARK_DELTA_PACKAGES="${FEDSPARK_DELTA_PACKAGES:-$delta_packages}"
if [ "$table" = "fashion_mnist" ]; then
  ensure_fashion_mnist_table "$lake_path"
fi

run_job train "${train_args[@]}"
