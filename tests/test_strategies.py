"""`sync` and `local` against single-process references written here, in float64.

The references rebuild the documented order of the rows themselves: training rows sorted by
(shard, id) with shard = pmod(xxhash64(id), 1024), Spark's hash; epoch e of `sync` walks them in the
order numpy.random.default_rng([seed, 3, e]).permutation(n), epoch e of `local` partition p in
default_rng([seed, 4, e, p]).permutation(n_p)."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from pyspark.sql import functions as F

from tests.conftest import train_and_load, write_table

N, D, K = 157, 6, 3


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    lake = tmp_path_factory.mktemp("lake")
    rng = np.random.default_rng(42)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X[:, :K] + 0.5 * rng.normal(size=(N, K))).argmax(axis=1)
    ids = rng.choice(10_000, size=N, replace=False).astype(np.int64) * 7 + 3
    write_table(spark, lake, "small", X, y, ids=ids)
    ordered = (spark.read.format("delta").load(str(lake / "small"))
               .withColumn("shard", F.expr("pmod(xxhash64(id), 1024)"))
               .orderBy("shard", "id").collect())
    Xs = np.array([r.features for r in ordered], dtype=np.float64)
    ys = np.array([r.label for r in ordered])
    return lake, Xs, ys


def run(lake, tmp_path, capsys, *sets):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", "data.table=small", "--set", "data.validation_fraction=0.0",
            "--set", "trainer.dtype=float64"]
    return train_and_load(capsys, argv, sets)


def softmax_grad(theta, X, y):
    W, b = theta[:D * K].reshape(D, K), theta[D * K:]
    z = X @ W + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return np.concatenate([(X.T @ p).ravel(), p.sum(axis=0)])


class Adam:
    def __init__(self, size, lr):
        self.m, self.v, self.lr = np.zeros(size), np.zeros(size), lr

    def step(self, theta, g, t):
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        alpha = self.lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        return theta - alpha * self.m / (np.sqrt(self.v) + 1e-7)


SOFTMAX = ["model.kind=softmax", "model.init=zeros", "trainer.optimizer.lr=0.05"]


def test_sync_equals_single_process_minibatch_sgd(table, tmp_path, capsys):
    lake, X, y = table
    B, epochs, seed = 17, 3, 5
    summary, theta = run(lake, tmp_path, capsys, *SOFTMAX, "trainer.strategy=sync",
                         f"trainer.batch_size={B}", f"trainer.epochs={epochs}",
                         f"trainer.seed={seed}", "data.partitions=3")
    assert summary["data"]["train_rows"] == N and summary["data"]["partitions"] == 3

    ref, opt, t = np.zeros(D * K + K), Adam(D * K + K, 0.05), 0
    for e in range(epochs):
        perm = np.random.default_rng([seed, 3, e]).permutation(N)
        for start in range(0, N, B):
            idx = perm[start:start + B]
            t += 1
            ref = opt.step(ref, softmax_grad(ref, X[idx], y[idx]), t)
    assert t >= 20
    assert np.abs(theta - ref).max() <= 1e-5


def test_sync_partitions_are_uneven_and_do_not_change_the_result(spark, table, tmp_path, capsys):
    lake, _, _ = table
    from pipelines.data.blocks import load_blocks
    from pipelines.data.lake import TableRef

    blocks = load_blocks(spark, str(lake), TableRef("small"), 3, 0, 0.0)
    sizes = sorted(h.rows for h in blocks.handles.collect())
    blocks.release()
    assert len(set(sizes)) > 1 and all(s % 17 for s in sizes), sizes
    common = [*SOFTMAX, "trainer.strategy=sync", "trainer.batch_size=17", "trainer.epochs=1"]
    thetas = [run(lake, tmp_path, capsys, *common, f"data.partitions={p}")[1] for p in (1, 3, 5)]
    assert np.abs(thetas[0] - thetas[1]).max() <= 1e-10
    assert np.abs(thetas[0] - thetas[2]).max() <= 1e-10


def test_local_with_one_partition_equals_single_process_loop(table, tmp_path, capsys):
    lake, X, y = table
    B, epochs, seed = 16, 3, 2
    _, theta = run(lake, tmp_path, capsys, *SOFTMAX, "trainer.strategy=local",
                   f"trainer.batch_size={B}", f"trainer.epochs={epochs}", f"trainer.seed={seed}",
                   "data.partitions=1")
    ref, opt, t = np.zeros(D * K + K), Adam(D * K + K, 0.05), 0
    for e in range(epochs):
        perm = np.random.default_rng([seed, 4, e, 0]).permutation(N)
        for start in range(0, N, B):
            idx = perm[start:start + B]
            t += 1
            ref = opt.step(ref, softmax_grad(ref, X[idx], y[idx]), t)
    assert np.abs(theta - ref).max() <= 1e-5


def test_local_averaging_period_changes_nothing_with_one_partition(table, tmp_path, capsys):
    lake, _, _ = table
    common = [*SOFTMAX, "trainer.strategy=local", "trainer.batch_size=16", "trainer.epochs=2",
              "data.partitions=1"]
    _, once = run(lake, tmp_path, capsys, *common)
    _, every3 = run(lake, tmp_path, capsys, *common, "trainer.average_every=3")
    assert np.abs(once - every3).max() <= 1e-10


def test_same_seed_same_weights_other_seed_other_weights(table, tmp_path, capsys):
    lake, _, _ = table
    common = ["model.kind=mlp", "model.hidden=[5]", "trainer.strategy=local", "trainer.epochs=2",
              "trainer.batch_size=8", "data.partitions=3", "trainer.average_every=10"]
    _, a = run(lake, tmp_path, capsys, *common, "trainer.seed=1")
    _, b = run(lake, tmp_path, capsys, *common, "trainer.seed=1")
    _, c = run(lake, tmp_path, capsys, *common, "trainer.seed=2")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_validation_split_is_exact_and_seeded(table, tmp_path, capsys, spark):
    lake, _, _ = table
    from pipelines.data.blocks import load_blocks
    from pipelines.data.lake import TableRef

    for seed in (0, 1):
        blocks = load_blocks(spark, str(lake), TableRef("small"), 3, seed, 0.2)
        assert (blocks.validation_rows, blocks.train_rows) == (round(0.2 * N), N - round(0.2 * N))
        blocks.release()


def test_local_with_averaging_rounds_equals_reference(spark, table, tmp_path, capsys):
    """Two partitions (rows of shard s live in partition s mod 2), averaging every 3 steps. The
    batch size is global: with n_p of the n rows, step j of a partition takes its rows
    [j*B*n_p // n, (j+1)*B*n_p // n), so both take ceil(n/B) steps an epoch. Weights and Adam
    moments are averaged by partition size after each round."""
    lake, X, y = table
    B, H, epochs, seed, P = 16, 3, 2, 4, 2
    _, theta = run(lake, tmp_path, capsys, *SOFTMAX, "trainer.strategy=local",
                   f"trainer.batch_size={B}", f"trainer.epochs={epochs}", f"trainer.seed={seed}",
                   f"data.partitions={P}", f"trainer.average_every={H}")
    shards = np.array([r.shard for r in spark.read.format("delta").load(str(lake / "small"))
                       .selectExpr("pmod(xxhash64(id), 1024) as shard").orderBy("shard").collect()])
    parts = [np.flatnonzero(shards % P == p) for p in range(P)]
    assert len(parts[0]) != len(parts[1])
    size, steps = D * K + K, -(-N // B)
    ref, m, v = np.zeros(size), np.zeros(size), np.zeros(size)
    for e in range(epochs):
        orders = [rows[np.random.default_rng([seed, 4, e, p]).permutation(len(rows))]
                  for p, rows in enumerate(parts)]
        for first in range(0, steps, H):
            results = []
            for order in orders:
                n_p = len(order)
                opt, th = Adam(size, 0.05), ref.copy()
                opt.m, opt.v = m.copy(), v.copy()
                for j in range(first, min(first + H, steps)):
                    idx = order[j * B * n_p // N:min((j + 1) * B * n_p // N, n_p)]
                    th = opt.step(th, softmax_grad(th, X[idx], y[idx]), e * steps + j + 1)
                results.append((th, opt.m, opt.v))
            w = [len(o) / N for o in orders]
            ref, m, v = (sum((wi * r[k] for wi, r in zip(w, results, strict=False)), np.zeros(size))
                         for k in range(3))
    assert np.abs(theta - ref).max() <= 1e-5


def _kill_python_workers_in_a_barrier_stage(sc, stop: threading.Event, killed: list[int]) -> None:
    """Wait for a running barrier stage of `sync` (0.2 s after it started), then SIGKILL every PySpark
    Python worker (the daemon's children): the stage loses its tasks mid-way."""
    def daemons() -> dict[int, int]:   # pid -> parent pid, of pyspark.daemon processes
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read()
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if b"pyspark.daemon" in cmd:
                found[int(entry)] = ppid
        return found

    from pipelines.training import data_parallel

    # a stage is named after the line that submitted it: run_barrier's collect
    lines = open(data_parallel.__file__).read().splitlines()
    site = f"data_parallel.py:{next(i for i, t in enumerate(lines, 1) if '.barrier()' in t)}"
    tracker = sc.statusTracker()
    while not stop.is_set():
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if not (info and info.name.endswith(site)):
                continue
            time.sleep(0.2)   # its tasks have started and formed their ring
            if stage_id not in tracker.getActiveStageIds():
                continue
            procs = daemons()
            for pid, ppid in procs.items():
                if ppid in procs:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            if killed:
                return
        time.sleep(0.005)


def test_a_task_killed_mid_stage_reruns_the_stage_to_the_same_weights(spark, tmp_path, capsys):
    lake = tmp_path / "lake"
    rng = np.random.default_rng(7)
    X = rng.normal(size=(4000, D)).astype(np.float32)
    write_table(spark, lake, "small", X, (X[:, :K] + rng.normal(size=(4000, K))).argmax(axis=1))
    common = [*SOFTMAX, "trainer.strategy=sync", "trainer.batch_size=1", "trainer.epochs=2",
              "data.partitions=2"]
    clean, ref = run(lake, tmp_path, capsys, *common)
    assert clean["stage_retries"] == 0
    stop, killed = threading.Event(), list[int]()
    killer = threading.Thread(target=_kill_python_workers_in_a_barrier_stage,
                              args=(spark.sparkContext, stop, killed))
    killer.start()
    try:
        summary, theta = run(lake, tmp_path, capsys, *common)
    finally:
        stop.set()
        killer.join()
    assert killed, "the stage finished before a worker could be killed"
    assert summary["stage_retries"] >= 1
    assert np.array_equal(theta, ref)
