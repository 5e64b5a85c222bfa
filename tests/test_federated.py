"""Federated mode on small real Delta tables: equivalences with `local` and with one client, what a
client's task returns, one task per sampled client, retried tasks, resume, partitioners and bad
input."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from pipelines import train
from pipelines.core.cli import main_wrapper
from pipelines.core.config import config_from_dict
from pipelines.federated import partitioners, rounds
from pipelines.federated.clients import partition_report, prepare_clients
from pipelines.federated.server import ServerRule, weighted_mean
from pipelines.training import runners
from tests.conftest import ROOT, save_arrow, write_table
from udfs.federated.clients import ClientReport

N, D, K = 240, 5, 3


def _data(seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X[:, :K] + 0.3 * rng.normal(size=(N, K))).argmax(axis=1)
    return X, y


def write_clients_table(spark, lake: Path, name: str, X, y, client_ids, split=None, ids=None):
    """A training table with a client_id column."""
    import pyarrow as pa

    write_table(spark, lake, name, X, y, split=split, ids=ids)
    path = str(lake / name)
    df = spark.read.format("delta").load(path).orderBy("id").toArrow()
    order = np.argsort(np.arange(len(X)) if ids is None else ids)
    df = df.append_column("client_id", pa.array(np.asarray(client_ids)[order].tolist()))
    save_arrow(spark, df, path)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("fedlake")
    X, y = _data()
    split = np.where(np.arange(N) % 5 == 0, "test", "train")
    write_table(spark, path, "fed", X, y, split)
    write_clients_table(spark, path, "one", X, y, ["a"] * N)
    # three clients holding the very same rows (ids differ)
    Xt, yt = np.tile(X[:40], (3, 1)), np.tile(y[:40], 3)
    write_clients_table(spark, path, "triplets", Xt, yt, ["a"] * 40 + ["b"] * 40 + ["c"] * 40,
                        split=np.array(["train"] * 120))
    write_clients_table(spark, path, "single", X[:40], y[:40], ["a"] * 40, split=np.array(["train"] * 40))
    write_clients_table(spark, path, "nulls", X, y, ["a"] * (N - 1) + [None])
    return path


def run(lake, tmp_path, capsys, *sets, extra=()):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", "trainer.strategy=federated", "--set", "trainer.dtype=float64", *extra]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    code = main_wrapper(train.main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1])
    with np.load(f"{summary['model_path']}/weights.npz", allow_pickle=False) as z:
        return summary, z["theta"], lines


SOFTMAX = ["model.kind=softmax", "model.init=zeros", "trainer.optimizer.name=sgd",
           "trainer.optimizer.lr=0.1"]
ONE_CLIENT = ["federated.partitioner=column", "federated.holdout_fraction=0.0",
              "federated.fraction=1.0", "federated.min_clients=1", "data.table=one"]


def test_fedavg_with_one_client_and_one_epoch_equals_local(lake, tmp_path, capsys):
    _, fed, _ = run(lake, tmp_path, capsys, *SOFTMAX, *ONE_CLIENT, "federated.rounds=3",
                    "federated.local_epochs=1", "federated.local_batch_size=16")
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'local'}",
            "--set", "trainer.dtype=float64", "--set", "data.table=one",
            "--set", "trainer.strategy=local", "--set", "data.partitions=1",
            "--set", "data.validation_fraction=0.0", "--set", "trainer.epochs=3",
            "--set", "trainer.batch_size=16", *sum([["--set", s] for s in SOFTMAX], [])]
    capsys.readouterr()
    assert main_wrapper(train.main, argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(f"{summary['model_path']}/weights.npz", allow_pickle=False) as z:
        local = z["theta"]
    assert np.abs(fed - local).max() <= 1e-10


def test_fedavg_of_identical_clients_equals_each_client(lake, tmp_path, capsys):
    common = [*SOFTMAX, "federated.partitioner=column", "federated.holdout_fraction=0.0",
              "federated.fraction=1.0", "federated.min_clients=1", "federated.rounds=2",
              "federated.local_epochs=3", "federated.local_batch_size=40"]
    s3, three, _ = run(lake, tmp_path, capsys, *common, "data.table=triplets")
    s1, one, _ = run(lake, tmp_path, capsys, *common, "data.table=single")
    assert (s3["clients"], s1["clients"]) == (3, 1)
    assert np.abs(three - one).max() <= 1e-10


def _prepared(spark, lake, **fed):
    config = config_from_dict({
        "lake": {"path": str(lake)}, "data": {"table": "fed"},
        "model": {"kind": "mlp", "hidden": [4]},
        "trainer": {"strategy": "federated", "optimizer": {"name": "sgd", "lr": 0.1}},
        "federated": {"clients": 8, "fraction": 0.5, "local_epochs": 1, "local_batch_size": 8,
                      "rounds": 2, **fed}})
    clients, test = prepare_clients(spark, config)
    spec = runners.model_spec(config, clients.n_features, clients.n_classes)
    return config, clients, test, spec


def _first_round(config, clients, spec):
    """Round 1's starting weights, client task and sampled clients."""
    return (runners.initial_theta(config, spec), rounds.client_round(config, spec, 1),
            rounds.sample(config.federated, 1, clients.count, config.trainer.seed))


def test_a_client_task_returns_only_an_update_a_count_and_scalars(spark, lake):
    config, clients, test, spec = _prepared(spark, lake)
    try:
        theta, task, sampled = _first_round(config, clients, spec)
        sc = spark.sparkContext
        sc.setJobGroup("fed-round-test", "one round")
        reports, dropped = rounds.run_round(sc, clients, task, theta, sampled)
        sc.setJobGroup("", "")
        assert not dropped and len(reports) == len(sampled) == 4
        for r in reports:
            assert type(r) is ClientReport and r.within_clip is None   # nothing else leaves the task
            assert [f.name for f in fields(r)] == ["client", "n", "train_loss", "seconds", "update",
                                                   "within_clip"]
            assert isinstance(r.update, np.ndarray) and r.update.shape == (spec.n_params,)
            assert isinstance(r.n, int)
            assert isinstance(r.train_loss, float) and isinstance(r.seconds, float)
        assert sorted(r.client for r in reports) == sampled
        tracker = sc.statusTracker()
        jobs = tracker.getJobIdsForGroup("fed-round-test")
        assert len(jobs) == 1
        stages = tracker.getJobInfo(jobs[0]).stageIds
        # tasks that ran (a cached lineage shows its skipped map stage too, with no completed task)
        assert sum(tracker.getStageInfo(s).numCompletedTasks for s in stages) == len(sampled)
    finally:
        clients.release()
        test.release()


def test_every_client_is_evaluated_on_its_own_hold_out_in_one_task_per_slot(spark, lake):
    """The federated evaluation is one job of one task per task slot, not one per client, and each
    client's accuracy is still the global model's on that client's own hold-out rows."""
    from udfs.core import models
    from udfs.data import blocks
    from udfs.federated.clients import ClientSplit, client_rows

    config, clients, test, spec = _prepared(spark, lake, holdout_fraction=0.25)
    try:
        theta = runners.initial_theta(config, spec)
        split = ClientSplit(config.trainer.seed, 0.25)
        sc = spark.sparkContext
        sc.setJobGroup("fed-eval-test", "every client's hold-out")
        summary, accuracies = rounds.federated_eval(sc, clients, spec, "float64", split, theta)
        sc.setJobGroup("", "")
        tracker = sc.statusTracker()
        jobs = tracker.getJobIdsForGroup("fed-eval-test")
        assert len(jobs) == 1
        while tracker.getJobInfo(jobs[0]).status != "SUCCEEDED":   # Spark's listener lags the job
            time.sleep(0.05)
        assert sum(tracker.getStageInfo(s).numCompletedTasks
                   for s in tracker.getJobInfo(jobs[0]).stageIds) == sc.defaultParallelism < clients.count
        expected = {}
        for handle in clients.handles.collect():   # local mode: the blocks are on this machine's disk
            block = blocks.load(handle.path)
            _, hold = client_rows(handle.path, handle.part, split)
            expected[handle.part] = float(np.mean(models.predict(spec, theta, block.X[hold].astype("float64"))
                                                  == block.y[hold]))
        assert accuracies == [expected[k] for k in range(clients.count)]
        assert summary == {"mean": np.mean(accuracies), "p10": np.percentile(accuracies, 10),
                           "min": min(accuracies)}
    finally:
        clients.release()
        test.release()


def test_a_client_whose_block_went_missing_is_rebuilt_and_the_round_is_the_same(spark, lake):
    from udfs.data import blocks

    config, clients, test, spec = _prepared(spark, lake)
    try:
        theta, task, sampled = _first_round(config, clients, spec)
        sc = spark.sparkContext
        before, _ = rounds.run_round(sc, clients, task, theta, sampled)
        clients.handles.mapPartitions(blocks.remove_partition).count()   # the executors lose the files
        after, _ = rounds.run_round(sc, clients, task, theta, sampled)
        assert clients.rebuilds == 1
        assert [(r.client, r.n) for r in after] == [(r.client, r.n) for r in before]
        assert all(np.array_equal(a.update, b.update) for a, b in zip(after, before, strict=False))
    finally:
        clients.release()
        test.release()


def test_partition_report_and_shards_hold_at_most_two_labels(spark, lake):
    config, clients, test, _ = _prepared(spark, lake, partitioner="shards", shards_per_client=2)
    try:
        assert clients.count == 8 and clients.labels.max() <= 2
        assert clients.sizes.sum() == N - N // 5
        report = partition_report(clients)
        assert report.startswith("clients 8") and "labels per client" in report
    finally:
        clients.release()
        test.release()


def test_partitioners():
    gen = lambda: np.random.default_rng(0)  # noqa: E731
    labels = np.repeat(np.arange(10), 100)
    iid = partitioners.assign("iid", labels, 10, gen(), 0.5, 2)
    assert np.bincount(iid).tolist() == [100] * 10
    shards = partitioners.assign("shards", labels, 20, gen(), 0.5, 2)
    assert max(len(np.unique(labels[shards == c])) for c in range(20)) <= 2
    skewed = partitioners.assign("dirichlet", labels, 10, gen(), 0.1, 2)
    spread = partitioners.assign("dirichlet", labels, 10, gen(), 100.0, 2)
    dominant = lambda a: np.mean([np.bincount(labels[a == c]).max() / (a == c).sum()  # noqa: E731
                                  for c in range(10)])
    assert dominant(skewed) > 0.5 > dominant(spread)
    sizes = np.bincount(partitioners.assign("quantity", labels, 10, gen(), 1.0, 2), minlength=10)
    assert sizes.sum() == 1000 and sizes.min() >= 1 and sizes.max() > 3 * np.median(sizes)
    np.testing.assert_array_equal(partitioners.assign("dirichlet", labels, 10, gen(), 0.1, 2), skewed)


def test_sampling_is_seeded_and_sized():
    fed = config_from_dict({"federated": {"fraction": 0.1, "min_clients": 2}}).federated
    a = rounds.sample(fed, 3, 100, 0)
    assert len(a) == 10 and a == rounds.sample(fed, 3, 100, 0) != rounds.sample(fed, 4, 100, 0)
    assert len(rounds.sample(fed, 1, 5, 0)) == 2  # min_clients
    poisson = config_from_dict({"federated": {"fraction": 0.3, "sampling": "poisson"}}).federated
    sizes = [len(rounds.sample(poisson, r, 100, 0)) for r in range(1, 200)]
    assert 25 < np.mean(sizes) < 35 and len(set(sizes)) > 3


def test_server_rules():
    theta = np.zeros(3, dtype=np.float32)
    updates, counts = [np.array([1.0, 0, 0]), np.array([0, 3.0, 0])], [3, 1]
    mean = weighted_mean(updates, counts)
    np.testing.assert_allclose(mean, [0.75, 0.75, 0])
    avg = ServerRule("fedavg")
    np.testing.assert_allclose(avg.apply(theta, mean, avg.init_state(theta)), [0.75, 0.75, 0])
    m = ServerRule("fedavgm", server_lr=1.0, server_momentum=0.5)
    state = m.init_state(theta)
    t1 = m.apply(theta, mean, state)
    t2 = m.apply(t1, mean, state)
    np.testing.assert_allclose(t2 - t1, 1.5 * mean)
    adam = ServerRule("fedadam", server_lr=0.1, tau=1e-3)
    state = adam.init_state(theta)
    step = adam.apply(theta, mean, state)
    mm, vv = 0.1 * mean, 0.99 * 1e-6 + 0.01 * mean ** 2
    np.testing.assert_allclose(step, 0.1 * mm / (np.sqrt(vv) + 1e-3), rtol=1e-6)


RESUMABLE = [*SOFTMAX, "data.table=fed", "federated.clients=6", "federated.fraction=0.5",
             "federated.rounds=5", "federated.local_epochs=1", "federated.local_batch_size=8",
             "trainer.checkpoint_every=1", "federated.strategy=fedadam", "federated.server_lr=0.1"]


def _start_run(lake: Path, runs: Path, name: str, prelude: str = "") -> subprocess.Popen:
    """pipelines/train.py in its own process (its own JVM), so it can be SIGKILLed; `prelude` runs
    first in that process."""
    argv = ["--run-name", name, "--set", f"lake.path={lake}", "--set", f"runs.path={runs}",
            "--set", "trainer.strategy=federated", "--set", "trainer.dtype=float64"]
    for s in RESUMABLE:
        argv += ["--set", s]
    script = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{prelude}\n"
              f"from pipelines import train\nfrom pipelines.core.cli import main_wrapper\n"
              f"raise SystemExit(main_wrapper(train.main, {argv!r}))\n")
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run_dir(runs: Path, name: str) -> Path | None:
    found = list(runs.glob(f"{name}-*/checkpoints"))
    return found[0].parent if found else None


def _resume(lake: Path, runs: Path, name: str, capsys) -> tuple[list[str], np.ndarray]:
    """The scheduled job's rerun: the same command with --resume-if-exists; the records of the
    killed attempt and this one hold no row twice."""
    capsys.readouterr()
    argv = ["--run-name", name, "--resume-if-exists", "--set", f"lake.path={lake}",
            "--set", f"runs.path={runs}", "--set", "trainer.strategy=federated",
            "--set", "trainer.dtype=float64", *sum([["--set", s] for s in RESUMABLE], [])]
    assert main_wrapper(train.main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    run_dir = _run_dir(runs, name)
    assert run_dir is not None, "the run left no checkpoint"
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    assert spark is not None
    for table, key in (("runs", ["attempt", "status"]), ("metrics", ["step", "name"])):
        rows = spark.read.format("delta").load(str(lake / table)).filter(
            f"run_id = '{run_dir.name}'").select(*key).collect()
        assert len(rows) == len(set(rows)), f"duplicate rows in {table}"
    assert {r.step for r in spark.read.format("delta").load(str(lake / "metrics")).filter(
        f"run_id = '{run_dir.name}'").collect()} == set(range(1, 6))
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        return out, z["theta"]


@pytest.fixture(scope="module")
def uninterrupted(lake, tmp_path_factory):
    """The resumable run, start to end in this process: (summary, final weights, printed lines)."""
    runs = tmp_path_factory.mktemp("whole")
    argv = ["--run-name", "whole", "--set", f"lake.path={lake}", "--set", f"runs.path={runs}",
            "--set", "trainer.strategy=federated", "--set", "trainer.dtype=float64"]
    for s in RESUMABLE:
        argv += ["--set", s]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main_wrapper(train.main, argv) == 0
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1])
    with np.load(f"{summary['model_path']}/weights.npz", allow_pickle=False) as z:
        return summary, z["theta"], lines


def test_federated_summary_and_report(uninterrupted):
    full, _, lines = uninterrupted
    assert full["rounds"] == 5 and full["clients"] == 6 and full["sampled_per_round"] == 3
    assert [r for r, _ in full["test_accuracy_by_round"]] == list(range(1, 6))
    assert set(full["client_accuracy"]) == {"mean", "p10", "min"}
    assert any(line.startswith("clients 6") for line in lines)


def test_stop_at_target_ends_the_run_at_the_round_reaching_it_and_a_resume_stays_there(
        lake, tmp_path, capsys, uninterrupted):
    """The resumable run with its target set to the accuracy the uninterrupted run first reached
    after round 1 (and before its cap) ends at that round with that round's weights; killed after
    that round's checkpoint (its summary and model removed), its resume runs no further round."""
    full, _, _ = uninterrupted
    acc = dict(full["test_accuracy_by_round"])
    reached = next(r for r in range(2, 5) if acc[r] > max(acc[q] for q in range(1, r)))
    summary, theta, lines = run(lake, tmp_path, capsys, *RESUMABLE, "federated.stop_at_target=true",
                                f"federated.target_accuracy={acc[reached]}",
                                extra=("--run-name", "stopping"))
    assert summary["rounds"] == summary["rounds_to_target"] == reached
    assert summary["stopped"] == (f"reached federated.target_accuracy={acc[reached]} "
                                  f"at round {reached}")
    assert summary["test_accuracy_by_round"] == full["test_accuracy_by_round"][:reached]
    whole = Path(full["run_dir"]) / "checkpoints" / f"round-{reached:04d}.npz"
    with np.load(whole, allow_pickle=False) as z:
        np.testing.assert_array_equal(theta, z["theta"])
    run_dir = Path(summary["run_dir"])
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "model")
    capsys.readouterr()
    assert main_wrapper(train.main, ["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(f"resuming {run_dir} after round {reached}") for line in out)
    assert not any(line.startswith(f"round {reached + 1}/") for line in out)
    resumed = json.loads(out[-1])
    assert (resumed["rounds"], resumed["stopped"]) == (reached, summary["stopped"])
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["theta"], theta)


@pytest.mark.slow  # a JVM of its own, killed, then a resume
def test_a_run_killed_after_a_round_resumes_to_the_same_weights(lake, tmp_path, capsys, uninterrupted):
    _, expected, _ = uninterrupted
    runs = tmp_path / "runs"
    proc = _start_run(lake, runs, "killed")
    while not list(runs.glob("killed-*/checkpoints/round-0001.json")):
        assert proc.poll() is None, f"the run ended before round 1: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_dir = _run_dir(runs, "killed")
    assert run_dir is not None, "the run left no checkpoint"
    assert not (run_dir / "summary.json").exists(), "killed too late to test a resume"
    out, theta = _resume(lake, runs, "killed", capsys)
    assert any(line.startswith(f"resuming {run_dir} after round") for line in out)
    np.testing.assert_array_equal(theta, expected)


@pytest.mark.slow  # a JVM of its own, killed, then a resume
def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(lake, tmp_path, capsys,
                                                                           uninterrupted):
    _, expected, _ = uninterrupted
    # the process SIGKILLs itself half-way through writing round 3's checkpoint weights
    prelude = """
import os, signal
from pipelines.store import artifacts
_write = artifacts.atomic_write
def dying_write(path, data):
    if path.name == "round-0003.npz":
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    _write(path, data)
artifacts.atomic_write = dying_write
"""
    runs = tmp_path / "runs"
    proc = _start_run(lake, runs, "torn", prelude)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    run_dir = _run_dir(runs, "torn")
    assert run_dir is not None, "the run left no checkpoint"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.json")) == \
        ["round-0001.json", "round-0002.json"]
    out, theta = _resume(lake, runs, "torn", capsys)
    assert any(line.startswith(f"resuming {run_dir} after round 2") for line in out)
    np.testing.assert_array_equal(theta, expected)


def test_a_failing_first_task_attempt_changes_nothing(lake, tmp_path):
    """Under a master that retries tasks (local[2,4]), every client task fails on its first attempt
    and is retried: the round's updates are the same as without failures."""
    script = tmp_path / "retry.py"
    script.write_text(f'''
import sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from pyspark import TaskContext
from pipelines.core.config import config_from_dict
from pipelines.federated import rounds as federated
from pipelines.federated.clients import prepare_clients
from pipelines.training import runners
from pipelines.core.session import build_session
from udfs.federated import clients as udf_clients

def flaky(rows, task, weights):
    if TaskContext.get().attemptNumber() == 0:
        raise RuntimeError("injected failure of the first attempt")
    yield from udf_clients.client_update(rows, task, weights)

spark = build_session("retry-test", {{"spark.master": "local[2,4]"}})
config = config_from_dict({{"lake": {{"path": {str(lake)!r}}}, "data": {{"table": "fed"}},
    "model": {{"kind": "mlp", "hidden": [4]}},
    "trainer": {{"strategy": "federated", "optimizer": {{"name": "sgd", "lr": 0.1}}}},
    "federated": {{"clients": 6, "fraction": 0.5, "local_epochs": 2, "local_batch_size": 8}}}})
c, test = prepare_clients(spark, config)
spec = runners.model_spec(config, c.n_features, c.n_classes)
theta = runners.initial_theta(config, spec)
sampled = federated.sample(config.federated, 1, c.count, 0)
task = federated.client_round(config, spec, 1)
clean, _ = federated.run_round(spark.sparkContext, c, task, theta, sampled)
retried, dropped = federated.run_round(spark.sparkContext, c, task, theta, sampled, update=flaky)
assert not dropped and len(retried) == len(clean) == 3
for a, b in zip(sorted(clean, key=lambda r: r.client), sorted(retried, key=lambda r: r.client)):
    assert a.client == b.client and a.n == b.n
    np.testing.assert_array_equal(a.update, b.update)
print("RETRY-OK")
''')
    # `flaky` lives in the script's __main__, so cloudpickle ships it by value to the executors
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RETRY-OK" in proc.stdout
    assert "injected failure of the first attempt" in proc.stderr


@pytest.mark.parametrize("sets,needle", [
    (["data.table=nulls", "federated.partitioner=column"], "'client_id' (federated.client_column) has 1 null"),
    (["data.table=one", "federated.partitioner=column", "federated.min_clients=2"],
     "fewer than federated.min_clients=2"),
    (["federated.fraction=1.5"], "federated.fraction"),
    (["federated.fraction=0"], "federated.fraction"),
    (["federated.strategy=fedmagic"], "federated.strategy"),
])
def test_bad_federated_input_names_the_setting(lake, tmp_path, capsys, sets, needle):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path}",
            "--set", "trainer.strategy=federated", "--set", "data.table=fed"]
    for s in sets:
        argv += ["--set", s]
    assert main_wrapper(train.main, argv) == 2
    assert needle in capsys.readouterr().err
