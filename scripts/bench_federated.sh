#!/usr/bin/env bash
# scripts/bench_federated.sh [--only overhead,iid,shards,dirichlet] [--lake DIR] [--out FILE] ...
# Set up (Java, venv, Fashion-MNIST in the lake) and run the federated benchmarks; see
# scripts/bench_federated.py for what each part measures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
ensure_fashion_mnist_table "$(lake_arg "$@")"
exec python scripts/bench_federated.py "$@"
