#!/usr/bin/env bash
# scripts/bench_allreduce.sh [--calls N] [--calls-spark N] [--torch-python PY] [--out FILE]
# Set up (Java, venv) and measure sync's per-step all-reduce ways; see scripts/bench_allreduce.py.
# The gloo way needs torch, which is not ours: give a Python that has it (a venv of its own), e.g.
#   python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch==2.15.0
#   scripts/bench_allreduce.sh --torch-python /tmp/torch-venv/bin/python
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
exec python scripts/bench_allreduce.py "$@"
