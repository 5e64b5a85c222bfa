#!/usr/bin/env bash
# scripts/bench_blocks.sh [--lake DIR] [--partitions 2] [--clients-config conf/fedavg_iid.yaml] [--out FILE]
# Set up (Java, venv, Fashion-MNIST in the lake), then time building blocks under the machine-wide
# benchmark lock (one timed run at a time); see scripts/bench_blocks.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
ensure_fashion_mnist_table "$(lake_arg "$@")"
exec flock /tmp/fedspark-bench.lock python scripts/bench_blocks.py "$@"
