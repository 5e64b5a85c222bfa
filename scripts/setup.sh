# Sourced by scripts/train.sh and scripts/test.sh: make the project runnable on a fresh machine.
# Safe to run again: each step checks before it acts.
#   - .venv with the project and its pinned dependencies (re-installed when pyproject.toml changes)
#   - Delta's jars fetched once, and the venv's spark-defaults.conf (pipelines/core/install.py), so
#     plain `spark-submit pipelines/<job>.py` works in the venv and logs at WARN
#   - Debian's dataset-fashion-mnist when its IDX files are missing
#   - Java for Spark
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDSPARK_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"

say() { printf '[fedspark] %s\n' "$*" >&2; }

ensure_java() {
  if ! command -v java >/dev/null 2>&1; then
    say "Java is required by Spark (17 or 21). Install it, e.g.: apt-get install -y openjdk-17-jre-headless"
    exit 1
  fi
}

ensure_venv() {
  local stamp="$VENV/.fedspark-installed"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing fedspark and its pinned dependencies into $VENV"
    # pip's --quiet still passes on the build backend's warnings: its output goes to a log that
    # only a failure shows
    local log="$VENV/.fedspark-pip.log"
    if ! { "$VENV/bin/pip" install --quiet --upgrade pip && "$VENV/bin/pip" install --quiet -e "$ROOT[dev]"; } \
        >"$log" 2>&1; then
      cat "$log" >&2
      say "installing into $VENV failed (the log above is in $log)"
      exit 1
    fi
    touch "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
  export PYSPARK_PYTHON="$VENV/bin/python"
  export PYSPARK_DRIVER_PYTHON="$VENV/bin/python"
  if command -v java >/dev/null 2>&1; then   # ensure_java says what is missing otherwise
    "$VENV/bin/python" -m pipelines.core.install
  fi
}

# ensure_extra NAME: the optional dependencies pyproject.toml's extra NAME pins (torch for
# model.kind=torch), installed into the venv once (again when pyproject.toml changes). Only the jobs
# that need them ask: torch with its CUDA libraries is a 6 GB venv.
ensure_extra() {
  local extra="$1" stamp="$VENV/.fedspark-extra-$1"
  if [ -f "$stamp" ] && [ "$stamp" -nt "$ROOT/pyproject.toml" ]; then
    return
  fi
  say "installing the optional dependencies fedspark[$extra] into $VENV (torch: ~4 GB of downloads)"
  local log="$VENV/.fedspark-pip-$extra.log"
  if ! "$VENV/bin/pip" install --quiet -e "$ROOT[dev,$extra]" >"$log" 2>&1; then
    cat "$log" >&2
    say "installing fedspark[$extra] into $VENV failed (the log above is in $log)"
    exit 1
  fi
  touch "$stamp"
}

ensure_fashion_mnist() {
  if [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    return
  fi
  if command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's dataset-fashion-mnist (IDX files into $FASHION_MNIST_DIR)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  fi
  if [ ! -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    say "Fashion-MNIST not found in $FASHION_MNIST_DIR and apt-get could not install it."
    say "Without apt: put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
    say "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory and set"
    say "FASHION_MNIST_DIR=/that/directory."
    exit 1
  fi
}

# run_job JOB [job arguments]: the `fedspark` command (pipelines/core/launcher.py), which runs
# pipelines/JOB.py through spark-submit with Delta's jars and extensions and the quiet log
# configuration; SUBMIT_OPTS are spark-submit options (--master, what package.sh ships).
run_job() {
  "$VENV/bin/python" -m pipelines.core.launcher "${SUBMIT_OPTS[@]}" "$@"
}
SUBMIT_OPTS=()

# Ingest Fashion-MNIST into <lake>/fashion_mnist unless that Delta table is already there.
ensure_fashion_mnist_table() {
  local lake_path="$1" local_path
  local_path="${lake_path#file:}"
  local_path="${local_path#//}"   # file:///x and file:/x are the directory /x
  if [ -d "$local_path/fashion_mnist/_delta_log" ]; then
    return
  fi
  ensure_fashion_mnist
  say "ingesting Fashion-MNIST into $lake_path/fashion_mnist"
  run_job ingest --source "idx:$FASHION_MNIST_DIR" --table fashion_mnist \
    --set "lake.path=$lake_path"
}

# The value of --lake among a benchmark's arguments, or ./lake.
lake_arg() {
  local lake_path="$ROOT/lake"
  while [ $# -gt 0 ]; do
    if [ "$1" = "--lake" ] && [ $# -gt 1 ]; then lake_path="$2"; fi
    shift
  done
  echo "$lake_path"
}

# Everything a job on Fashion-MNIST needs, from the repository root.
prepare_all() {
  cd "$ROOT"
  ensure_java
  ensure_venv
  ensure_fashion_mnist
}
