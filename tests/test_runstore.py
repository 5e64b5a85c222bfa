"""runs.path on a Hadoop URI, against a real HDFS (Hadoop's MiniDFSCluster from scripts/minidfs.sh):
a run is written there whole (no temporary files left), evaluate.py and score.py read its model by
URI, an interrupted run resumes from its URI to the same weights, and the run-name lock refuses a
second job."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pipelines import score, train
from pipelines.core.cli import main_wrapper
from pipelines.core.errors import UserError
from pipelines.store import locks, rundir
from tests.conftest import ROOT, blobs, write_table

pytestmark = pytest.mark.cluster

SETS = ["data.table=blobs", "model.kind=softmax", "trainer.optimizer.lr=0.05", "trainer.epochs=3",
        "trainer.strategy=local",   # the sample experiment (the default) is sync
        "trainer.checkpoint_every=1", "trainer.dtype=float64"]


@pytest.fixture(scope="module")
def hdfs(spark, tmp_path_factory):
    """The URI of a fresh HDFS for this module; the NameNode/DataNode JVM is stopped by its PID."""
    state = tmp_path_factory.mktemp("minidfs")
    script = str(ROOT / "scripts" / "minidfs.sh")
    env = {**os.environ, "PYTHON": sys.executable}
    uri = subprocess.run(["bash", script, "start", str(state)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    try:
        yield uri
    finally:
        subprocess.run(["bash", script, "stop", str(state)], check=True)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("runstore_lake")
    X, y, split = blobs(2_000, 8, 4, seed=7)
    write_table(spark, path, "blobs", X, y, split)
    return path


def train_argv(lake, runs_uri: str, *extra: str) -> list[str]:
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={runs_uri}", *extra]
    for s in SETS:
        argv += ["--set", s]
    return argv


def walk(spark, uri: str) -> list[str]:
    """Every file under uri, relative to it, listed by Hadoop itself."""
    path = spark._jvm.org.apache.hadoop.fs.Path(uri)
    found = path.getFileSystem(spark._jsc.hadoopConfiguration()).listFiles(path, True)
    out = []
    while found.hasNext():
        out.append(found.next().getPath().toString().removeprefix(uri + "/"))
    return sorted(out)


def job(module, argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main_wrapper(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def read(fs: rundir.HadoopFS, uri: str) -> bytes:
    """The bytes of a file that must exist."""
    data = fs.read(uri)
    assert data is not None, f"{uri} does not exist"
    return data


def weights_at(run_uri: str, tmp_path) -> np.ndarray:
    """The model's weights, copied out of HDFS by Hadoop (not by the code under test)."""
    local = tmp_path / f"weights-{len(list(tmp_path.iterdir()))}.npz"
    rundir.HadoopFS(run_uri).get(f"{run_uri}/model/weights.npz", local)
    with np.load(local, allow_pickle=False) as z:
        return z["theta"]


@pytest.fixture(scope="module")
def finished(hdfs, lake):
    """One run named `hd` trained to the end on HDFS: its summary."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main_wrapper(train.main, train_argv(lake, f"{hdfs}/runs", "--run-name", "hd"))
    assert code == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_a_run_on_hdfs_is_written_whole(spark, hdfs, finished):
    run_uri = finished["run_dir"]
    assert run_uri == f"{hdfs}/runs/{finished['run_id']}"
    assert finished["model_path"] == f"{run_uri}/model"
    fs = rundir.HadoopFS(hdfs)
    files = walk(spark, run_uri)
    assert files == ["checkpoints/epoch-0001.json", "checkpoints/epoch-0001.npz",
                     "checkpoints/epoch-0002.json", "checkpoints/epoch-0002.npz",
                     "config.yaml", "curves.png", "metrics.jsonl", "model/spec.json",
                     "model/weights.npz", "run.json", "summary.json", "table.json"]
    assert json.loads(read(fs, f"{run_uri}/summary.json")) == finished
    assert [json.loads(line)["epoch"] for line in read(fs, f"{run_uri}/metrics.jsonl").splitlines()] == [1, 2, 3]
    assert walk(spark, f"{hdfs}/runs/.locks") == []   # the run-name lock was released
    assert not [p for p in os.listdir(tempfile.gettempdir())
                if p.startswith(f"fedspark-{finished['run_id']}")]   # staging removed


def test_evaluate_and_score_read_the_model_by_uri(spark, lake, finished, tmp_path, capsys):
    # spark-submit, as on a cluster: evaluate.py reads the run's config from HDFS before its
    # SparkContext exists, through spark-submit's JVM
    from pipelines.core.session import submit_args

    spark_submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    proc = subprocess.run([spark_submit, *submit_args(), "--master", "local[1]", "pipelines/evaluate.py",
                           "--model", finished["run_dir"]], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run_id"] == finished["run_id"]
    assert abs(result["test_accuracy"] - finished["test_accuracy"]) < 1e-9

    code, out, err = job(score, ["--model", finished["run_dir"], "--input", "blobs", "--output", "scores",
                                 "--set", f"lake.path={lake}"], capsys)
    assert code == 0, err[-3000:]
    scored = json.loads(out[-1])
    assert scored["model"] == finished["run_dir"] and scored["model_id"] == finished["run_id"]
    rows = spark.read.format("delta").load(str(lake / "scores")).orderBy("id").collect()
    table = spark.read.format("delta").load(str(lake / "blobs")).orderBy("id").collect()
    assert len(rows) == len(table) == scored["rows"]
    # the prediction is the arg max of X W + b, with the weights as HDFS holds them
    theta = weights_at(finished["run_dir"], tmp_path)
    X = np.array([r.features for r in table], dtype=np.float64)
    W, b = theta[: 8 * 4].reshape(8, 4), theta[8 * 4:]
    np.testing.assert_array_equal([r.prediction for r in rows], np.argmax(X @ W + b, axis=1))


def test_an_interrupted_run_resumes_from_its_uri(hdfs, lake, finished, tmp_path, capsys):
    expected = weights_at(finished["run_dir"], tmp_path)
    code, out, err = job(train, train_argv(lake, f"{hdfs}/again", "--run-name", "cut"), capsys)
    assert code == 0, err[-3000:]
    run_uri = json.loads(out[-1])["run_dir"]
    fs = rundir.HadoopFS(run_uri)
    # as if the job died after epoch 1's checkpoint, in the middle of publishing epoch 2's:
    # a finished .npz without its .json, and a hidden temporary file of the next one
    for rel in ("summary.json", "checkpoints/epoch-0002.json", "model/weights.npz", "model/spec.json"):
        fs.delete(f"{run_uri}/{rel}")
    assert fs.create_new(f"{run_uri}/checkpoints/.epoch-0002.json.tmp-{socket.gethostname()}-1", b"{")

    code, out, err = job(train, train_argv(lake, f"{hdfs}/again", "--run-name", "cut",
                                           "--resume-if-exists"), capsys)
    assert code == 0, err[-3000:]
    assert any(line.startswith(f"resuming {run_uri} after epoch 1") for line in out)
    resumed = json.loads(out[-1])
    assert resumed["run_dir"] == run_uri
    np.testing.assert_array_equal(weights_at(run_uri, tmp_path), expected)
    assert [json.loads(line)["epoch"] for line in read(fs, f"{run_uri}/metrics.jsonl").splitlines()] == [1, 2, 3]

    # --resume of the finished run by its URI prints its summary again
    code, out, err = job(train, ["--resume", run_uri], capsys)
    assert code == 0, err[-3000:]
    assert json.loads(out[-1]) == resumed


def test_the_run_name_lock_refuses_a_second_job(hdfs, lake, capsys, monkeypatch):
    runs_uri = f"{hdfs}/locked"
    with locks.lock_run_name(runs_uri, "busy") as lock:
        code, _, err = job(train, train_argv(lake, runs_uri, "--run-name", "busy"), capsys)
        assert code == 2 and "run name 'busy' is in use" in err and f"pid {os.getpid()}" in err
        assert isinstance(lock, locks.HadoopRunLock) and lock.uri in err
    fs = rundir.HadoopFS(runs_uri)
    assert fs.names(runs_uri) == [".locks"] and fs.names(f"{runs_uri}/.locks") == []

    # a job killed hard on this host left its lock: the next job takes it over, another host's is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for host, taken in ((socket.gethostname(), True), ("elsewhere", False)):
        fs.delete(f"{runs_uri}/.locks/busy.lock")
        assert fs.create_new(f"{runs_uri}/.locks/busy.lock",
                             f"host {host} pid {dead} start 1 since then".encode())
        if taken:
            with locks.lock_run_name(runs_uri, "busy"):
                assert f"pid {os.getpid()}" in read(fs, f"{runs_uri}/.locks/busy.lock").decode()
        else:
            with pytest.raises(UserError, match="run name 'busy' is in use"):
                locks.lock_run_name(runs_uri, "busy")

    # a live job takes the lock between our reading the stale holder and moving it: ours moves the
    # live lock aside, sees it is not the one it judged stale, puts it back and stops
    fs.delete(f"{runs_uri}/.locks/busy.lock")
    assert fs.create_new(f"{runs_uri}/.locks/busy.lock",
                         f"host {socket.gethostname()} pid {dead} start 1 since then".encode())
    live = f"host {socket.gethostname()} pid 1 start 0 since now"
    rename = rundir.HadoopFS.rename

    def racing_rename(self, src, dst):
        if src.endswith("busy.lock") and ".stale-" in dst:   # the live job got in first
            self.delete(src)
            assert self.create_new(src, live.encode())
        return rename(self, src, dst)

    monkeypatch.setattr(rundir.HadoopFS, "rename", racing_rename)
    with pytest.raises(UserError, match="run name 'busy' is in use"):
        locks.lock_run_name(runs_uri, "busy")
    monkeypatch.undo()
    assert read(fs, f"{runs_uri}/.locks/busy.lock").decode() == live
