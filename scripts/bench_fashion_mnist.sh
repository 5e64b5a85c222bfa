#!/usr/bin/env bash
# scripts/bench_fashion_mnist.sh [--only numpy,tensorflow,local,sync,mllib] [--sync-epochs N] [--mllib-iters N]
#                                [--tf-seed FILE] [--lake DIR] [--out FILE]
# Set up (Java, venv, Fashion-MNIST) and benchmark the sample job; see scripts/bench_fashion_mnist.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
exec python scripts/bench_fashion_mnist.py "$@"
