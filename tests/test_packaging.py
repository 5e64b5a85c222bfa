"""The project installed as users get it: built into a wheel and installed (not editable) into a
scratch environment, outside the source tree, it finds its defaults (conf/ travels as data files)
and runs a training job whose driver and executors import the installed packages."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT

SOURCES = ("pipelines", "udfs", "conf", "pyproject.toml", "README.md")


def test_a_wheel_installed_outside_the_tree_runs_a_job(blobs_lake, tmp_path):
    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    prefix = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--prefix", str(prefix),
                    str(src)], check=True, cwd=tmp_path)
    python = str(prefix / "bin" / "python")
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    # the dependencies come from the test's own environment, but not its editable fedspark
    (purelib / "_fedspark_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_DRIVER_PYTHON")}
    env["PYSPARK_PYTHON"] = python

    where = subprocess.run([python, "-c", "import pipelines, udfs; from pipelines.core.config import CONF_DIR;"
                            "print(pipelines.__file__); print(udfs.__file__); print(CONF_DIR)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split()
    assert all(Path(p).is_relative_to(prefix) for p in where), where
    assert (Path(where[2]) / "default.yaml").is_file()

    job = subprocess.run([python, "-m", "pipelines.train", "--set", f"lake.path={blobs_lake}",
                          "--set", "data.table=blobs", "--set", f"runs.path={tmp_path / 'runs'}",
                          "--set", "model.kind=softmax", "--set", "trainer.epochs=1",
                          "--set", "trainer.batch_size=256", "--set", "trainer.optimizer.lr=0.1",
                          "--set", "spark.conf={spark.master: 'local[2]'}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.5
    assert (Path(summary["model_path"]) / "weights.npz").is_file()
