#!/usr/bin/env bash
# scripts/package.sh — what spark-submit ships to executors whose Python lacks the project:
#   build/fedspark.zip       the `pipelines` and `udfs` packages, for --py-files
#   build/fedspark-env.tar.gz   a Python environment with what executors import, for --archives
#                               (unpacked as ./fedspark-env in each executor's directory)
# Prints the spark-submit options that ship both, one per line.
#
# The environment is a venv built from the same base interpreter as .venv, holding the
# distributions udfs.EXECUTOR_REQUIREMENTS names (numpy, scipy, pandas, pyarrow, cryptography,
# threadpoolctl, and what they depend on) at the versions installed in .venv: executors run only
# udfs code, so the driver's own dependencies (scikit-learn, matplotlib, pydantic, dp-accounting,
# PyYAML, delta-spark's Python half) stay out, and pyspark comes from the cluster's Spark. The
# project itself comes from the zip, so executors run the code being submitted. A venv links its
# python to the base interpreter's absolute path, so the workers need that interpreter at the same
# path: true for the local standalone cluster and for machines built from one image; elsewhere
# build the environment with conda-pack, or use a container image (Kubernetes). We pack with tar
# rather than venv-pack (unmaintained since 2018): the archive is the venv as it is, which is all
# Spark's --archives needs. Every application unpacks it on the driver and on each executor, so it
# leaves out the packages' test suites and the installers (pip, setuptools), and its gzip stream
# is stored, not compressed (level 0): Spark unpacks a .tar.gz with the system's tar and gzip,
# 2.0 s for this one against 4.4 s at gzip -1 (measured on this 2-core machine); a plain .tar
# would go through Spark's Java unpacker, which refuses the venv's symlink to its interpreter.
# Rebuilt only when the requirements' versions, this script or the sources change.
# FEDSPARK_PACKAGE_EXTRAS=torch also packs torch and safetensors (udfs.EXECUTOR_EXTRAS; from .venv,
# so install 'fedspark[torch]' there first) for model.kind=torch: the default PyPI wheel brings
# the CUDA libraries, about 6 GB unpacked, so by default executors must have torch installed.
# FEDSPARK_PACKAGE_EXTRAS=sklearn packs scikit-learn for model.kind=sklearn (both: torch,sklearn).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ensure_venv >/dev/null

BUILD="$ROOT/build"
ENV_DIR="$BUILD/pyenv"
ENV_TAR="$BUILD/fedspark-env.tar.gz"
ZIP="$BUILD/fedspark.zip"
mkdir -p "$BUILD"

build_zip() {
  "$VENV/bin/python" - "$ZIP" <<'PY'
import os, sys, zipfile
target = sys.argv[1]
tmp = target + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    for package in ("pipelines", "udfs"):
        for folder, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    zf.write(os.path.join(folder, name))
os.replace(tmp, target)
PY
}

build_env() {
  local stamp="$ENV_DIR/.fedspark-deps" want pins
  pins="$("$VENV/bin/python" -c '
import importlib.metadata as m, os
from udfs import EXECUTOR_EXTRAS, EXECUTOR_REQUIREMENTS
extras = [r for e in os.environ.get("FEDSPARK_PACKAGE_EXTRAS", "").split(",") if e for r in EXECUTOR_EXTRAS[e]]
print("\n".join(f"{r}=={m.version(r)}" for r in (*EXECUTOR_REQUIREMENTS, *extras)))')"
  want="$( { echo "$pins"; cat "$ROOT/scripts/package.sh"; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$ENV_TAR" ]; then
    return
  fi
  say "building the executors' Python environment in $ENV_DIR"
  rm -rf "$ENV_DIR"
  "$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')" -m venv "$ENV_DIR"
  mapfile -t runtime <<<"$pins"
  "$ENV_DIR/bin/pip" install --quiet "${runtime[@]}"
  find "$ENV_DIR/lib" -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +
  "$ENV_DIR/bin/python" -m pip uninstall --quiet --yes pip setuptools
  echo "$want" >"$stamp"
  say "packing $ENV_TAR"
  tar -C "$ENV_DIR" -cf - . | "$VENV/bin/python" -c '
import gzip, shutil, sys
with gzip.open(sys.argv[1], "wb", compresslevel=0) as out:
    shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)' "$ENV_TAR.tmp"
  mv "$ENV_TAR.tmp" "$ENV_TAR"
}

build_zip
build_env
printf '%s\n' --py-files "$ZIP" --archives "$ENV_TAR#fedspark-env" \
  --conf spark.pyspark.python=./fedspark-env/bin/python \
  --conf "spark.pyspark.driver.python=$VENV/bin/python"
