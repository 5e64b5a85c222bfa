#!/usr/bin/env bash
# scripts/bench_mllib.sh [--only mlp,softmax] [--mlpc-iters 50,100,200,400] [--lr-iters 50,100,200]
#                        [--max-epochs 30] [--lake DIR] [--out FILE]
# Set up (Java, venv, Fashion-MNIST in the lake) and compare our local strategy with MLlib; see
# scripts/bench_mllib.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
ensure_fashion_mnist_table "$(lake_arg "$@")"
exec python scripts/bench_mllib.py "$@"
