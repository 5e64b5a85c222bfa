#!/usr/bin/env bash
# scripts/bench_scale.sh [--rows 2500000,5000000,10000000,20000000] [--features 100] [--partitions 8]
#                        [--passes 5] [--cache-gb 4] [--driver-memory 6g] [--lake DIR] [--skip mllib,floor,accuracy]
# Set up, then run scripts/bench_scale.py under the machine-wide benchmark lock (one timed run at
# a time). MLlib gets native BLAS when the system has libblas.so.3 (Debian: libopenblas0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ensure_java
ensure_venv
if ! ldconfig -p | grep -q 'libblas.so.3 '; then
  say "no libblas.so.3: MLlib falls back to its Java BLAS (apt-get install -y libopenblas0)"
fi
exec flock /tmp/fedspark-bench.lock python scripts/bench_scale.py "$@"
