"""Synthetic tables (pipelines/generate.py), sparse wide input, the workers' memory budget, blocks
rebuilt after they went missing, and bad training tables. References are written here: a plain
numpy/scipy gradient-descent loop and the generator's stored true model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy import sparse

from pipelines import generate, train
from pipelines.core.cli import main_wrapper
from pipelines.data import lake
from pipelines.data.blocks import load_blocks
from pipelines.data.synthetic_tables import read_truth
from pipelines.training import data_parallel
from udfs.core.models import ModelSpec
from udfs.data import blocks


def gen(lake_dir, capsys, *args) -> dict:
    capsys.readouterr()
    code = main_wrapper(generate.main, [*args, "--set", f"lake.path={lake_dir}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def run_train(lake_dir, runs, capsys, *sets) -> tuple[int, dict | None, str]:
    argv = ["--set", f"lake.path={lake_dir}", "--set", f"runs.path={runs}"]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    code = main_wrapper(train.main, argv)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), out.err


def weights(summary: dict) -> np.ndarray:
    with np.load(Path(summary["model_path"]) / "weights.npz", allow_pickle=False) as z:
        return z["theta"]


def rows_of(spark, lake_dir, table: str) -> list:
    return sorted(spark.read.format("delta").load(f"{lake_dir}/{table}").collect(), key=lambda r: r.id)


WIDE = 1_000_000   # the widest linear model: 10^6 features, never densified


@pytest.fixture(scope="module")
def gen_lake(spark, tmp_path_factory):
    """dense: 6000 x 8 binary; wide (sparse): 4000 x 10^6 at 10 non-zeros a row, binary."""
    path = tmp_path_factory.mktemp("genlake")
    for argv in (["--table", "dense", "--rows", "6000", "--features", "8", "--partitions", "3",
                  "--seed", "3"],
                 ["--table", "wide", "--rows", "4000", "--features", str(WIDE), "--density", str(10 / WIDE),
                  "--partitions", "2", "--seed", "4"]):
        assert main_wrapper(generate.main, [*argv, "--set", f"lake.path={path}"]) == 0
    return path


def test_generated_rows_do_not_depend_on_partitions_and_follow_the_truth(spark, gen_lake, lake_dir,
                                                                         capsys):
    summary = gen(lake_dir, capsys, "--table", "dense", "--rows", "6000", "--features", "8",
                  "--partitions", "5", "--seed", "3")
    assert summary["rows"] == 6000 and not summary["skipped"]
    here, there = rows_of(spark, lake_dir, "dense"), rows_of(spark, gen_lake, "dense")
    assert [r.id for r in here] == list(range(6000))
    assert [(r.features, r.label, r.split) for r in here] == [(r.features, r.label, r.split)
                                                              for r in there]
    df = spark.read.format("delta").load(f"{lake_dir}/dense")
    assert dict((f.name, f.dataType.simpleString()) for f in df.schema.fields) == {
        "id": "bigint", "features": "array<float>", "label": "int", "split": "string"}
    truth = read_truth(spark, str(lake_dir), "dense")
    X = np.array([r.features for r in here])
    y = np.array([r.label for r in here])
    assert truth.W.shape == (8, 1)
    # the stored model is the one that drew the labels: it predicts them far better than chance
    assert ((X @ truth.W[:, 0] + truth.b[0] > 0) == y).mean() > 0.8
    assert 0.15 < np.mean([r.split == "test" for r in here]) < 0.25
    again = gen(lake_dir, capsys, "--table", "dense", "--rows", "6000", "--features", "8",
                "--partitions", "5", "--seed", "3")
    assert again["skipped"] and again["version"] == summary["version"]


def test_sync_full_batch_recovers_the_true_model(gen_lake, tmp_path, capsys, spark):
    code, summary, err = run_train(
        gen_lake, tmp_path, capsys, "data.table=dense", "model.kind=logistic", "model.init=zeros",
        "trainer.strategy=sync", "trainer.batch_size=100000", "trainer.epochs=150",
        "trainer.optimizer.lr=0.2", "data.validation_fraction=0.0")
    assert code == 0 and summary is not None, err
    truth = read_truth(spark, str(gen_lake), "dense")
    theta = weights(summary).astype(np.float64)
    w, b = theta[:8], theta[8]
    cosine = w @ truth.W[:, 0] / np.linalg.norm(w) / np.linalg.norm(truth.W[:, 0])
    assert cosine > 0.98, cosine
    assert abs(b - truth.b[0]) < 0.5
    assert summary["test_accuracy"] > 0.8


def test_sparse_wide_logistic_equals_a_scipy_gradient_descent_loop(spark, gen_lake, tmp_path, capsys):
    df = spark.read.format("delta").load(f"{gen_lake}/wide")
    assert df.schema["features"].dataType.simpleString() == \
        "struct<size:int,indices:array<int>,values:array<float>>"
    code, summary, err = run_train(
        gen_lake, tmp_path, capsys, "data.table=wide", "model.kind=logistic", "model.init=zeros",
        "trainer.strategy=sync", "trainer.batch_size=100000", "trainer.epochs=5",
        "trainer.optimizer.name=sgd", "trainer.optimizer.lr=0.5", "trainer.dtype=float64",
        "data.validation_fraction=0.0")
    assert code == 0 and summary is not None, err
    assert summary["model"]["layers"] == [WIDE, 1]
    train_rows = [r for r in rows_of(spark, gen_lake, "wide") if r.split == "train"]
    indptr = np.concatenate(([0], np.cumsum([len(r.features.indices) for r in train_rows])))
    X = sparse.csr_matrix((np.concatenate([r.features.values for r in train_rows]).astype(np.float32),
                           np.concatenate([r.features.indices for r in train_rows]), indptr),
                          shape=(len(train_rows), WIDE)).astype(np.float64)
    y = np.array([r.label for r in train_rows], dtype=np.float64)
    w, b = np.zeros(WIDE), 0.0
    for _ in range(5):
        p = 1.0 / (1.0 + np.exp(-(X @ w + b)))
        w, b = w - 0.5 * (X.T @ (p - y)) / len(y), b - 0.5 * (p - y).mean()
    theta = weights(summary)
    assert np.abs(theta[:WIDE] - w).max() <= 1e-5 and abs(theta[WIDE] - b) <= 1e-5


def test_sparse_blocks_stay_sparse(spark, gen_lake):
    got = load_blocks(spark, str(gen_lake), lake.TableRef("wide"), 2, 0, 0.0)
    try:
        assert got.n_features == WIDE
        dense_bytes = 4000 * WIDE * 4
        assert got.feature_bytes < dense_bytes / 100
        held = got.handles.mapPartitions(blocks.residency).collect()
        assert all(h["sparse"] for h in held) and len(held) == 2
    finally:
        got.release()


def test_memory_budget_memory_maps_blocks_and_changes_nothing(spark, gen_lake, tmp_path, capsys):
    common = ("data.table=dense", "model.kind=logistic", "trainer.strategy=sync",
              "trainer.batch_size=256", "trainer.epochs=2", "trainer.dtype=float64")
    results = []
    for gb in (4.0, 0.0):
        code, summary, err = run_train(gen_lake, tmp_path / str(gb), capsys, *common,
                                       f"data.worker_cache_gb={gb}")
        assert code == 0 and summary is not None, err
        results.append(weights(summary))
    assert np.array_equal(results[0], results[1])
    for gb, expected in ((4.0, True), (0.0, False)):
        got = load_blocks(spark, str(gen_lake), lake.TableRef("dense"), 2, 0, 0.2, cache_gb=gb)
        try:
            held = got.handles.mapPartitions(blocks.residency).collect()
            assert [h["in_memory"] for h in held] == [expected, expected]
            if not expected:
                assert all(h["worker_resident_bytes"] == 0 for h in held)
        finally:
            got.release()


def test_a_missing_block_is_rebuilt_and_the_job_gives_the_same_answer(spark, gen_lake):
    got = load_blocks(spark, str(gen_lake), lake.TableRef("dense"), 2, 0, 0.2)
    spec = ModelSpec("logistic", (8, 1))
    theta = np.linspace(-1, 1, 9).astype(np.float32)
    try:
        before = data_parallel.evaluate(spark.sparkContext, got, spec, "float32", theta, ("test",))
        got.handles.mapPartitions(blocks.remove_partition).count()   # the executors lose the files
        after = data_parallel.evaluate(spark.sparkContext, got, spec, "float32", theta, ("test",))
        assert got.rebuilds == 1
        assert after == before
    finally:
        got.release()


# --- bad training tables: exit 2, a message naming the column or the row -------------------------

def _bad(spark, lake_dir, tmp_path, capsys, name: str, **sets) -> str:
    code, _, err = run_train(lake_dir, tmp_path / "runs", capsys, f"data.table={name}",
                             "model.kind=softmax", "trainer.epochs=1", *sets.values())
    assert code == 2, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return err


def test_features_of_mixed_lengths_name_the_row(spark, lake_dir, tmp_path, capsys):
    import pyarrow as pa

    table = pa.table({"id": pa.array([0, 1, 2, 3], pa.int64()),
                      "features": pa.array([[1.0, 2.0], [1.0, 2.0], [3.0], [1.0, 0.0]],
                                           pa.list_(pa.float32())),
                      "label": pa.array([0, 1, 0, 1], pa.int32()),
                      "split": pa.array(["train"] * 4)})
    spark.createDataFrame(table).coalesce(1).write.format("delta").save(str(lake_dir / "ragged"))
    err = _bad(spark, lake_dir, tmp_path, capsys, "ragged")
    assert "row id 2: features has 1 values, expected 2" in err


def test_string_label_names_the_column(spark, lake_dir, tmp_path, capsys):
    spark.createDataFrame([(0, [1.0, 2.0], "cat", "train")], "id long, features array<float>, "
                          "label string, split string").write.format("delta").save(
        str(lake_dir / "strlabel"))
    err = _bad(spark, lake_dir, tmp_path, capsys, "strlabel")
    assert "column 'label' is string, expected int or double" in err


def test_empty_table_is_a_clear_error(spark, lake_dir, tmp_path, capsys):
    spark.createDataFrame([], "id long, features array<float>, label int, split string").write.format(
        "delta").save(str(lake_dir / "empty"))
    err = _bad(spark, lake_dir, tmp_path, capsys, "empty")
    assert "table empty@0 has no rows" in err


def test_sparse_index_beyond_the_declared_dimension_names_the_row(spark, lake_dir, tmp_path, capsys):
    schema = ("id long, features struct<size:int,indices:array<int>,values:array<float>>, "
              "label int, split string")
    rows = [(i, (10, [1, 3], [1.0, 2.0]), i % 2, "train") for i in range(6)]
    rows[4] = (41, (10, [2, 10], [1.0, 1.0]), 0, "train")
    spark.createDataFrame(rows, schema).write.format("delta").save(str(lake_dir / "badsparse"))
    err = _bad(spark, lake_dir, tmp_path, capsys, "badsparse")
    assert "row id 41: features index 10 is outside the declared dimension 10" in err


def _block_on_disk(directory: Path, rows: int, width: int, budget: int) -> str:
    """A block directory written by the executors' writer (no Spark needed to read it back)."""
    directory.mkdir(parents=True)
    writer = blocks._Writer(str(directory))
    ids = np.arange(rows, dtype=np.int64)
    writer.add(pa.RecordBatch.from_pydict({
        "id": ids,
        "features": pa.array(list(np.ones((rows, width), dtype=np.float32)), pa.list_(pa.float32())),
        "label": pa.array(ids % 2, pa.int32()),
        "shard": pa.array(np.zeros(rows, dtype=np.int32)),
        "split": pa.array(["train"] * rows),
    }))
    writer.finish()
    blocks.seal(str(directory), budget)
    return str(directory)


def test_the_worker_cache_budget_bounds_blocks_and_derived_values(tmp_path):
    rows, width = 1000, 50
    stored = rows * width * 4 + rows * (4 + 8 + 4 + 1)      # features + y, id, shard, test
    layout = blocks.Layout(tuple([0] + [rows] * blocks.N_SHARDS), seed=0, validation_fraction=0.0)
    roles_bytes = 2 * rows * 8                                 # train rows and their global index
    # (budget, block opened in memory, roles kept, block still in memory once the roles are kept)
    for budget, opened, roles_kept, held in ((stored + roles_bytes + 4096, True, True, True),
                                             (stored + 4096, True, True, False),
                                             (stored // 2, False, True, False),
                                             (roles_bytes // 2, False, False, False)):
        path = _block_on_disk(tmp_path / str(budget) / "part-00000", rows, width, budget)
        block = blocks.load(path)
        assert block.in_memory is opened
        assert isinstance(block.X, np.memmap) is not opened
        roles = blocks.derived(path, ("roles", layout), lambda b: blocks.roles(b, layout))
        assert len(roles.train) == rows
        assert (len(blocks._DERIVED.get(path, {})) == 1) is roles_kept
        again = blocks.load(path)
        assert again.in_memory is held
        np.testing.assert_array_equal(again.X, block.X)
        assert blocks.resident_bytes() <= budget
        def make_plan(b: blocks.Block, r: blocks.Roles = roles) -> tuple[np.ndarray, np.ndarray]:
            return r.train, np.array([0, rows])

        plan = blocks.derived(path, ("plan", layout), make_plan)
        assert plan[0] is roles.train
        if roles_kept:   # the plan shares the roles' array: only its bounds are new
            assert blocks.resident_bytes() == again.cached_bytes + roles_bytes + 16
