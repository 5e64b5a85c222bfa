#!/usr/bin/env bash
# scripts/bench_federated.sh [--only overhead,iid,shards,dirichlet] [--lake DIR] [--out FILE] ...
# Set up (Java, venv, Fashion-MNIST in the lake) and run the federated benchmarks; see
# scripts/bench_federated.py for what each part measures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
lake_path="$ROOT/lake"
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--lake" ]; then j=$((i + 1)); lake_path="${!j}"; fi
done
ensure_fashion_mnist_table "$lake_path"
exec python scripts/bench_federated.py "$@"
