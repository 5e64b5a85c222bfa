"""What every benchmark script shares: progress on stderr and a description of the machine and the
versions the numbers were measured on (docs/BENCHMARKS.md quotes them)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import idx

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


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
