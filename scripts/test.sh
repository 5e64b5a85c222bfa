#!/usr/bin/env bash
# scripts/test.sh [pytest args] — set up (venv, Fashion-MNIST) and run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
prepare_all
exec python -m pytest "$@"
