#!/usr/bin/env bash
# scripts/test.sh [pytest args] — set up (venv, Fashion-MNIST), ruff and mypy, then the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
# the habits that keep the house in order, before the (long) suite: lint and types, whole tree
python -m ruff check .
python -m mypy
# Two pytest workers (pytest-xdist), each with its own local[2] SparkSession: one process alone keeps
# these 2 cores ~80% busy (JVM start-ups, py4j round trips, subprocess jobs), two keep them full.
# --dist loadfile: a test module runs whole on one worker, so its module fixtures are built once and
# the standalone cluster and MiniDFS (used by one module each) start once.
exec python -m pytest -n "${FEDSPARK_TEST_WORKERS:-2}" --dist loadfile "$@"
