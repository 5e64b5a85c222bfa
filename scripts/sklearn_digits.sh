#!/usr/bin/env bash
# scripts/sklearn_digits.sh [--lake DIR] — the data of conf/sklearn_federated.yaml: scikit-learn's
# digits (1,797 8x8 images of 10 classes; pixels scaled to [0, 1]) written as build/digits.csv
# (label, f0..f63, split: every 5th row test) and ingested into the Delta table `digits` (integer
# labels: --classes 10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ensure_java
ensure_venv
lake_path="$(lake_arg "$@")"
mkdir -p "$ROOT/build"
"$VENV/bin/python" - "$ROOT/build/digits.csv" <<'PY'
import sys

import numpy as np
from sklearn.datasets import load_digits

X, y = load_digits(return_X_y=True)
split = np.where(np.arange(len(y)) % 5 == 0, "test", "train")
with open(sys.argv[1], "w") as out:
    out.write(",".join(["label", *(f"f{i}" for i in range(X.shape[1])), "split"]) + "\n")
    for row, label, s in zip(X / 16.0, y, split):
        out.write(",".join([str(label), *(f"{v:.4f}" for v in row), s]) + "\n")
PY
run_job ingest --source "csv:$ROOT/build/digits.csv" --table digits --label label --features-prefix f --classes 10 \
  --set "lake.path=$lake_path"
