#!/usr/bin/env bash
# scripts/bench_score.sh [--rows N] [--features D] [--classes K] [--partitions P] [--lake DIR] [--out FILE]
# Set up (Java, venv) and measure batch scoring against a numpy predict; see scripts/bench_score.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
exec python scripts/bench_score.py "$@"
