"""What every benchmark script shares: progress on stderr and a description of the machine and the
versions the numbers were measured on (docs/BENCHMARKS.md quotes them)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data import idx

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FEDSPARK_VENV", ROOT / ".venv"))


class BenchError(RuntimeError):
    """One way of a benchmark failed; the others still run and are reported."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout holds only the JSON object and the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU model, cores this process may use, memory."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    return {"cpu": cpu, "nproc": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("pyspark", "delta-spark", "numpy"):
        found[package] = importlib.metadata.version(package)
    java = subprocess.run(["java", "-version"], capture_output=True, text=True)
    found["java"] = (java.stderr.splitlines() or ["?"])[0]
    return found


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST pixels scaled to [0, 1] as float32, as pipelines/ingest.py writes them to the
    table (row i of the train split is id i there)."""
    images, labels = idx.read_split(DATA_DIR, split)
    return images.astype(np.float32) / np.float32(255.0), labels.astype(np.int32)


def submit_env() -> dict[str, str]:
    """What scripts/setup.sh's ensure_venv exports: driver and workers run the venv's Python."""
    python = str(VENV / "bin" / "python")
    return {**os.environ, "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python,
            "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def submit_command(script: str, args: list[str], conf: dict[str, str] | None = None) -> list[str]:
    """scripts/setup.sh's spark_submit: the venv's spark-submit plus the Delta package and conf,
    and any `--conf` the benchmark fixes (driver memory, maxResultSize)."""
    from pipelines.core.session import submit_args

    extra = [arg for key, value in (conf or {}).items() for arg in ("--conf", f"{key}={value}")]
    return [str(VENV / "bin" / "spark-submit"), *submit_args(), *extra, script, *args]


def spark_submit(label: str, script: str, args: list[str], conf: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Run one job to completion and return its summary (the last stdout line, JSON). Its progress
    lines are echoed to stderr as they come, so a long sync run shows it is alive; Spark's own log
    is kept aside and shown only when the job fails."""
    cmd = submit_command(script, args, conf)
    log(f"{label}: {' '.join(cmd)}")
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=submit_env(), stdout=subprocess.PIPE, stderr=err,
                                text=True)
        assert proc.stdout is not None  # stdout=PIPE
        last = ""
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.strip():
                last = line
                if not line.startswith("{"):
                    log(f"{label}: {line}")
        code = proc.wait()
        if code != 0:
            err.seek(0)
            tail = "\n".join(err.read().splitlines()[-25:])
            raise BenchError(f"{label}: spark-submit exited with {code}; end of its stderr:\n{tail}")
    try:
        summary = json.loads(last)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{label}: last stdout line is not the summary JSON: {last[:200]!r}") from exc
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    return summary


def peer_venv(path: Path, requirements: tuple[str, ...]) -> Path:
    """The Python of a venv of its own for a peer framework (TensorFlow, Flower): never in our
    environment, so its pins cannot clash with ours. Created with the pinned `requirements` when
    missing or pinned differently (a stamp file records what was installed)."""
    python, stamp = path / "bin" / "python", path / ".fedspark-peer"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating the peer venv {path} with {' '.join(requirements)}")
    for cmd in ([sys.executable, "-m", "venv", "--clear", str(path)],
                [str(python), "-m", "pip", "install", "--quiet", *requirements]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python


def emit(report: dict[str, Any], out: Path | None, markdown: Callable[[dict[str, Any]], str]) -> int:
    """Print a benchmark's report (JSON, then its markdown table), also to `out` when given; the
    exit status is 1 when a way failed."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)
    print()
    print(markdown(report))
    return 1 if any("error" in r for r in report["results"].values()) else 0
