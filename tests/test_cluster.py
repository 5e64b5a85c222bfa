"""A real Spark standalone cluster (scripts/cluster.sh: a master and two workers on 127.0.0.1),
jobs submitted through scripts/train.sh with the code and a Python environment shipped by
scripts/package.sh. The executors' Python is the shipped environment's, which does not have the
project installed: they import `udfs` from the shipped zip."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import fashion_mnist, train_and_load, write_table

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Start the cluster on a free port (other clusters on this machine are left alone) and stop
    exactly its processes, by the PIDs cluster.sh recorded, after the tests."""
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "FEDSPARK_CLUSTER_DIR": str(state),
           "FEDSPARK_MASTER_PORT": str(free_port()), "FEDSPARK_MASTER_UI_PORT": "0"}
    started = subprocess.run(["bash", "scripts/cluster.sh", "start"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    pids = [int((state / f"{n}.pid").read_text()) for n in ("master", "worker-1", "worker-2")]
    try:
        yield started.stdout.strip().splitlines()[-1], state
    finally:
        subprocess.run(["bash", "scripts/cluster.sh", "stop"], cwd=ROOT, env=env, check=True)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"pid {pid} still runs"


def train_sh(*args: str) -> dict:
    done = subprocess.run(["bash", "scripts/train.sh", *args], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cluster_status_lists_the_three_processes(cluster):
    _, state = cluster
    env = {**os.environ, "FEDSPARK_CLUSTER_DIR": str(state)}
    out = subprocess.run(["bash", "scripts/cluster.sh", "status"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert [line.split()[:2] for line in out.stdout.splitlines()[:3]] == [
        ["master", "running"], ["worker-1", "running"], ["worker-2", "running"]]


def test_executors_import_udfs_from_the_shipped_zip(cluster, tmp_path):
    master, _ = cluster
    script = tmp_path / "origin.py"
    script.write_text(
        "import json\n"
        "from pipelines.core.session import build_session\n"
        "from udfs.core.worker import origin\n"
        "spark = build_session('origin')\n"
        "print(spark.sparkContext.master)\n"
        "print(json.dumps(spark.sparkContext.parallelize(range(4), 4).map(origin).collect()))\n"
        "spark.stop()\n")
    ship = subprocess.run(["bash", "scripts/package.sh"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split("\n")
    from pipelines.core.session import submit_args

    done = subprocess.run([str(ROOT / ".venv/bin/spark-submit"), "--master", master,
                           *[a for a in ship if a], *submit_args(), str(script)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == master
    where = json.loads(lines[-1])
    assert {w["udfs"] for w in where} == {"./fedspark.zip/udfs/__init__.py"}
    assert all(w["python"].endswith("/fedspark-env/bin/python") for w in where)
    assert all("/fedspark-env/lib/" in w["numpy"] for w in where)


@pytest.fixture(scope="module")
def small_lake(spark, tmp_path_factory):
    """Every 10th Fashion-MNIST image of each split (6,000 train, 1,000 test) as `fashion_mnist`:
    the jobs are the real sample and federated configs on real images, small enough that each
    application's start-up, not its training, is most of its time."""
    path = tmp_path_factory.mktemp("cluster-lake")
    write_table(spark, path, "fashion_mnist", *fashion_mnist(every=10))
    return path


SAMPLE = ("--set", "trainer.epochs=1")
FEDERATED = ("--config", "conf/fedavg_iid.yaml", "--set", "federated.clients=4",
             "--set", "federated.fraction=0.5", "--set", "federated.rounds=2",
             "--set", "federated.local_epochs=1", "--set", "federated.local_batch_size=50")


@pytest.mark.parametrize("job", [SAMPLE, FEDERATED], ids=["sample", "federated"])
def test_cluster_gives_the_same_test_accuracy_as_local(cluster, small_lake, tmp_path, capsys, job):
    """The same job through train.sh on the cluster and in this process's local[2] session."""
    master, _ = cluster
    runs = ("--set", f"runs.path={tmp_path}", "--set", f"lake.path={small_lake}")
    on_cluster = train_sh("--master", master, *job, *runs)
    on_local, _ = train_and_load(capsys, [*job, *runs])
    assert on_cluster["test_accuracy"] == on_local["test_accuracy"]
    assert on_cluster["test_accuracy"] > 0.5
