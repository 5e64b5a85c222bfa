#!/usr/bin/env bash
# scripts/test.sh [pytest args] — set up (venv, Fashion-MNIST), ruff and mypy, then the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
ensure_extra torch   # the model.kind=torch tests
# the habits that keep the house in order, before the (long) suite: lint and types, whole tree
python -m ruff check .
python -m mypy
exec python -m pytest "$@"
