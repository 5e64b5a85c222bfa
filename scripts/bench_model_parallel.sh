#!/usr/bin/env bash
# scripts/bench_model_parallel.sh [--features 2000000] [--rows 20000] [--shards 1,2,4,8] [--lake DIR] [--out FILE] ...
# Set up (Java, venv) and run the model-parallel benchmark on a generated wide sparse table; see
# scripts/bench_model_parallel.py. Wrap it in `flock /tmp/fedspark-bench.lock` on a shared machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
exec python scripts/bench_model_parallel.py "$@"
