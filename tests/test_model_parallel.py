"""`model_parallel`: the first layer sharded by feature blocks, against `sync` on the same batches;
sparse input; vertical parties (what crosses between them); resume; bad input (exit 2).

`sync` is the reference for equality: it is itself tested against a numpy loop written
independently (test_strategies.py), and the issue asks for "the same weights as sync"."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines import evaluate, train
from pipelines.core.cli import main_wrapper
from pipelines.core.config import ConfigError, config_from_dict
from pipelines.model_parallel import training, vertical
from tests.conftest import blobs, fashion_mnist, save_arrow, train_and_load, write_table
from udfs.core import models
from udfs.core.models import ModelSpec, init_params
from udfs.core.seeding import Stream, rng
from udfs.model_parallel import shards

N, D, K = 240, 12, 3


def write_sparse(spark, lake: Path, name: str, X: np.ndarray, y: np.ndarray, split: np.ndarray,
                 ids: np.ndarray | None = None) -> None:
    """The same rows as a sparse table: id, indices array<int>, values array<float>, label, split."""
    ids = np.arange(len(X), dtype=np.int64) if ids is None else ids
    rows, cols = np.nonzero(X)
    offsets = pa.array(np.searchsorted(rows, np.arange(len(X) + 1)).astype(np.int32))
    table = pa.table({
        "id": pa.array(ids),
        "indices": pa.ListArray.from_arrays(offsets, pa.array(cols.astype(np.int32))),
        "values": pa.ListArray.from_arrays(offsets, pa.array(X[rows, cols].astype(np.float32))),
        "label": pa.array(y.astype(np.int32)), "split": pa.array(split.tolist())})
    save_arrow(spark, table, str(lake / name))


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("mp-lake")
    X, y, split = blobs(N, D, K, seed=3, spread=1.5)
    X[np.abs(X) < 0.8] = 0.0          # sparse enough for the sparse table to mean something
    write_table(spark, path, "small", X, y, split)
    write_sparse(spark, path, "small_sparse", X, y, split)
    return path, X, y, split


def run(lake_path: Path, tmp_path: Path, capsys, *sets: str, table: str = "small",
        extra: Sequence[str] = (), wire_log: list | None = None) -> tuple[dict, np.ndarray]:
    argv = ["--set", f"lake.path={lake_path}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", f"data.table={table}", "--set", "trainer.dtype=float64",
            "--set", "trainer.batch_size=16", "--set", "data.validation_fraction=0.1", *extra]
    return train_and_load(capsys, argv, sets, wire_log)


def test_shards_draw_the_first_layer_and_head_like_init_params():
    spec = ModelSpec("mlp", (10, 7, 4, 3))
    whole = init_params(spec, rng(5, Stream.INIT), "glorot_uniform", np.float64)
    bounds = shards.block_bounds(10, 3)
    rows = [shards.init_rows(spec, 5, "glorot_uniform", "float64", a, b)
            for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
    head = shards.init_head(spec, 5, "glorot_uniform", "float64")
    np.testing.assert_array_equal(np.concatenate([r.ravel() for r in rows] + [head]), whole)


@pytest.mark.parametrize("kind, layers", [("softmax", (7, 3)), ("logistic", (7, 1)), ("linear", (7, 1)),
                                          ("mlp", (7, 5, 4, 3))])
def test_split_gradient_is_the_whole_models(kind, layers):
    """The head's gradient plus X^T dZ for the first layer is udfs.core.models' gradient of the whole
    model, for every kind (no Spark: the arithmetic the cells and the driver share)."""
    spec = ModelSpec(kind, layers)
    gen = np.random.default_rng(0)
    theta = gen.normal(size=spec.n_params)
    X = gen.normal(size=(9, 7))
    y = gen.integers(0, max(layers[-1], 2), 9) if kind != "linear" else gen.normal(size=9)
    loss, grad = models.loss_and_grad(spec, theta, X, y)
    h = layers[1]
    W, head = theta[:7 * h].reshape(7, h), theta[7 * h:]
    mp_loss, head_grad, dZ = shards.head_step(spec, head, X @ W, y)
    assert mp_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(np.concatenate([(X.T @ dZ).ravel(), head_grad]), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model, shards_, partitions", [
    (["model.kind=softmax"], 4, 1),
    (["model.kind=mlp", "model.hidden=[6]"], 3, 2),
])
def test_model_parallel_equals_sync(lake, tmp_path, capsys, monkeypatch, model, shards_, partitions):
    """Same batches, same maths: R = 1 updates each shard locally, R = 2 sums the row blocks'
    contributions through the shuffle; the state RDD is checkpointed every 7 steps on the way. The
    saved weights evaluate like any other model."""
    path, *_ = lake
    monkeypatch.setattr(training, "LINEAGE_EVERY", 7)
    common = [*model, "trainer.epochs=2", "trainer.seed=7"]
    _, ref = run(path, tmp_path, capsys, *common, "trainer.strategy=sync", "data.partitions=2")
    summary, theta = run(path, tmp_path, capsys, *common, "trainer.strategy=model_parallel",
                         f"model_parallel.shards={shards_}", f"data.partitions={partitions}")
    assert summary["data"]["train_rows"] * 2 // 16 >= 20
    assert np.abs(theta - ref).max() <= 1e-5
    h = summary["model"]["layers"][1]
    assert summary["shards"] == shards_
    assert summary["max_param_block"] == -(-D // shards_) * h       # the widest block, measured
    data = summary["data"]
    most_rows = max(16, data["validation_rows"], data["test_rows"])  # a batch, or a role evaluated
    assert 0 < summary["max_task_bytes"]["returned"] <= most_rows * h * 8
    capsys.readouterr()
    assert main_wrapper(evaluate.main, ["--model", summary["run_dir"]]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)


def test_sparse_table_trains_like_the_dense_one(lake, tmp_path, capsys):
    path, *_ = lake
    common = ["model.kind=softmax", "trainer.epochs=1", "trainer.batch_size=48",
              "trainer.strategy=model_parallel", "model_parallel.shards=4", "data.partitions=2"]
    _, dense = run(path, tmp_path, capsys, *common)
    summary, sparse = run(path, tmp_path, capsys, *common, table="small_sparse")
    assert summary["input"] == "sparse" and summary["n_features"] == D
    assert np.abs(dense - sparse).max() <= 1e-10


def test_generated_sparse_table_equals_sync(lake, tmp_path, capsys):
    """A sparse table from pipelines/generate.py (features as struct<size, indices, values>):
    model_parallel gives sync's weights on it."""
    from pipelines import generate

    path, *_ = lake
    capsys.readouterr()
    assert main_wrapper(generate.main, ["--table", "gen_sparse", "--rows", "300", "--features", "40",
                                        "--classes", "3", "--density", "0.2", "--partitions", "2",
                                        "--set", f"lake.path={path}"]) == 0
    common = ["model.kind=softmax", "trainer.epochs=1"]
    _, ref = run(path, tmp_path, capsys, *common, "trainer.strategy=sync", table="gen_sparse")
    summary, theta = run(path, tmp_path, capsys, *common, "trainer.strategy=model_parallel",
                         "model_parallel.shards=3", "data.partitions=2", table="gen_sparse")
    assert summary["input"] == "sparse" and summary["n_features"] == 40
    assert np.abs(theta - ref).max() <= 1e-5


def test_resume_continues_to_the_same_model(lake, tmp_path, capsys):
    path, *_ = lake
    common = ["model.kind=mlp", "model.hidden=[5]", "trainer.epochs=2", "trainer.checkpoint_every=1",
              "trainer.strategy=model_parallel", "model_parallel.shards=2", "data.partitions=2"]
    summary, whole = run(path, tmp_path, capsys, *common)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "checkpoints" / "epoch-0001.npz").is_file()
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "model")
    capsys.readouterr()
    assert main_wrapper(train.main, ["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "epoch 1/2" not in out
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["theta"], whole, rtol=0, atol=1e-12)

    # the cells vanish from the executors after epoch 1's checkpoint: the run stops, saying that
    # --resume continues it, and the resumed run ends at the same model
    from pyspark import SparkFiles

    started = time.time()
    root = Path(SparkFiles.getRootDirectory()) / "fedspark-blocks"

    class LosingCells(list):   # the label owner's wire log (train.main's wire_log), as a hook
        def append(self, item) -> None:
            super().append(item)
            if list((tmp_path / "lost").glob("*/checkpoints/epoch-0001.json")):
                for meta in root.glob("*/part-*/meta.json"):
                    if meta.stat().st_mtime >= started and "width" in json.loads(meta.read_text()):
                        shutil.rmtree(meta.parent)

    argv = ["--set", f"lake.path={path}", "--set", f"runs.path={tmp_path / 'lost'}", "--set", "data.table=small",
            "--set", "trainer.dtype=float64", "--set", "trainer.batch_size=16",
            "--set", "data.validation_fraction=0.1"]   # as run() does
    for item in common:
        argv += ["--set", item]
    capsys.readouterr()
    assert main_wrapper(partial(train.main, wire_log=LosingCells()), argv) == 1
    err = capsys.readouterr().err
    assert "a model-parallel cell went missing" in err and "continues it" in err
    (lost,) = (tmp_path / "lost").glob("*-s0-*")
    assert not (lost / "summary.json").exists()
    assert main_wrapper(train.main, ["--resume", str(lost)]) == 0
    with np.load(lost / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["theta"], whole, rtol=0, atol=1e-12)


# --- vertical parties --------------------------------------------------------------------------------

def write_parties(spark, lake: Path, X: np.ndarray, y: np.ndarray, split: np.ndarray,
                  bands: list[tuple[int, int]], missing_from: int, missing: float, seed: int) -> dict:
    """Columns in bands, one table per band (id, features), labels in a fourth (id, label, split);
    `missing` of the ids dropped from band `missing_from`. Returns the parties config."""
    ids = np.arange(len(X), dtype=np.int64) * 3 + 11
    gen = np.random.default_rng(seed)
    parties = {}
    for i, (lo, hi) in enumerate(bands):
        keep = np.ones(len(X), bool)
        if i == missing_from:
            keep[gen.choice(len(X), int(round(missing * len(X))), replace=False)] = False
        offsets = pa.array(np.arange(0, (keep.sum() + 1) * (hi - lo), hi - lo, dtype=np.int32))
        band = pa.table({"id": pa.array(ids[keep]), "features": pa.ListArray.from_arrays(
            offsets, pa.array(X[keep, lo:hi].astype(np.float32).ravel()))})
        save_arrow(spark, band, str(lake / f"band{i}"))
        parties[f"p{i}"] = {"table": f"band{i}", "columns": [lo, hi]}
    labels = pa.table({"id": pa.array(ids), "label": pa.array(y.astype(np.int32)),
                       "split": pa.array(split.tolist())})
    save_arrow(spark, labels, str(lake / "labels"))
    parties["owner"] = {"table": "labels"}
    return parties


def party_sets(parties: dict) -> list[str]:
    sets = ["model_parallel.label_party=owner"]
    for name, entry in parties.items():
        sets.append(f"model_parallel.parties.{name}.table={entry['table']}")
        if "columns" in entry:
            sets.append(f"model_parallel.parties.{name}.columns=[{entry['columns'][0]}, {entry['columns'][1]}]")
    return sets


def test_vertical_parties_train_like_centralised_and_share_only_activations(spark, lake, tmp_path, capsys):
    """Three feature parties (4 columns each) and a label party, 2% of the ids missing from one: the
    run uses the aligned rows, reports what was left out, and equals `sync` on a single table of
    those rows. Everything the label owner sent to or received from the parties' tasks is a
    batch-by-width array (batch rows, or a role's rows when evaluating, by the hidden width)."""
    path, X, y, split = lake
    parties = write_parties(spark, path, X, y, split, [(0, 4), (4, 8), (8, 12)], 1, 0.02, seed=1)
    dropped = len(X) - spark.read.format("delta").load(str(path / "band1")).count()
    assert dropped == round(0.02 * len(X))
    kept_ids = np.array(sorted(r.id for r in spark.read.format("delta").load(str(path / "band1"))
                               .select("id").collect()))
    ids = np.arange(len(X), dtype=np.int64) * 3 + 11
    keep = np.isin(ids, kept_ids)
    write_table(spark, path, "aligned", X[keep], y[keep], split[keep], ids[keep])
    common = ["model.kind=mlp", "model.hidden=[6]", "trainer.epochs=2", "data.partitions=2"]
    _, ref = run(path, tmp_path, capsys, *common, "trainer.strategy=sync", table="aligned")

    log: list = []
    summary, theta = run(path, tmp_path, capsys, *common, "trainer.strategy=model_parallel",
                         *party_sets(parties), wire_log=log)
    assert summary["vertical"]["aligned_rows"] == keep.sum()
    assert summary["vertical"]["left_out_rows"] == {"p0": dropped, "p1": 0, "p2": dropped, "owner": dropped}
    assert summary["shards"] == 3
    assert np.abs(theta - ref).max() <= 1e-5

    width = 6
    n_roles = {summary["data"]["validation_rows"], summary["data"]["test_rows"]}
    sent = [v for d, v in log if d == "sent"]
    received = [v for d, v in log if d == "received"]
    assert sent and received
    for message in sent:                 # dZ by row block
        assert isinstance(message, dict) and set(message) <= {0, 1}
        assert sum(len(v) for v in message.values()) <= 16
        assert all(v.dtype == np.float64 and v.ndim == 2 and v.shape[1] == width for v in message.values())
    assert len(received) % 6 == 0        # 2 row blocks x 3 parties answer every call
    for i in range(0, len(received), 6):
        call = dict(received[i:i + 6])
        assert sorted(call) == list(range(6))
        if call[0] is None:              # the last update of an epoch has no forward pass
            assert all(v is None for v in call.values())
            continue
        for partials in call.values():   # partial pre-activations of a batch or of a role's rows
            assert partials.dtype == np.float64 and partials.ndim == 2 and partials.shape[1] == width
        rows = [call[r * 3].shape[0] for r in range(2)]
        assert all(call[r * 3 + s].shape[0] == rows[r] for r in range(2) for s in range(3))
        assert sum(rows) <= 16 or sum(rows) in n_roles


@pytest.mark.parametrize("mp, message", [
    ({"parties": {"a": {"table": "t", "columns": [0, 4]}, "b": {"table": "u", "columns": [5, 9]},
                  "l": {"table": "v"}}, "label_party": "l"}, "columns 4..4 are assigned to no party"),
    ({"parties": {"a": {"table": "t", "columns": [0, 5]}, "b": {"table": "u", "columns": [4, 9]},
                  "l": {"table": "v"}}, "label_party": "l"}, "columns 4..4 are assigned twice"),
    ({"parties": {"a": {"table": "t", "columns": [0, 5]}, "b": {"table": "u", "columns": [5, 9]}},
      "label_party": None}, "needs a label party"),
    ({"parties": {"a": {"table": "t", "columns": [0, 5]}}, "label_party": "z"}, "not one of the parties"),
    ({"parties": {"a": {"table": "t"}, "l": {"table": "v"}}, "label_party": "l"}, "hold no columns"),
])
def test_bad_parties_are_config_errors(mp, message):
    with pytest.raises(ConfigError, match=message):
        vertical.parse(config_from_dict({"model_parallel": mp}).model_parallel)


def test_bad_input_exits_2_before_training(spark, lake, tmp_path, capsys):
    path, X, y, split = lake
    base = ["--set", f"lake.path={path}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", "trainer.strategy=model_parallel", "--set", "data.table=small"]

    def fails(*sets: str) -> str:
        argv = list(base)
        for s in sets:
            argv += ["--set", s]
        capsys.readouterr()
        assert main_wrapper(train.main, argv) == 2
        return capsys.readouterr().err

    assert "more than the 12 features" in fails("model_parallel.shards=13")
    assert "label party" in fails("model_parallel.parties.a.table=small",
                                  "model_parallel.parties.a.columns=[0, 12]")
    spark.createDataFrame(pa.table({"key": pa.array([1, 2]), "label": pa.array([0, 1]),
                                    "split": pa.array(["train", "train"])})
                          ).write.format("delta").mode("overwrite").save(str(path / "no_id"))
    err = fails("model_parallel.parties.a.table=small", "model_parallel.parties.a.columns=[0, 12]",
                "model_parallel.parties.l.table=no_id", "model_parallel.label_party=l")
    assert "party 'l'" in err and "'id'" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- the full Fashion-MNIST (slow) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("mp-fmnist")
    X, y, split = fashion_mnist()
    write_table(spark, path, "fashion_mnist", X, y, split)
    return path, X, y, split


@pytest.mark.slow
@pytest.mark.parametrize("model", [["model.kind=softmax"], ["model.kind=mlp", "model.hidden=[128]"]])
def test_fashion_mnist_model_parallel_equals_sync(fmnist, tmp_path, capsys, model):
    """S = 4, one epoch of 100 global batches of 480 (48,000 training rows), float64. One row block
    (R = 1): a step is one job of S tasks, no shuffle; R = 2 is checked on the small table above."""
    path, *_ = fmnist
    common = [*model, "trainer.epochs=1", "trainer.batch_size=480", "data.validation_fraction=0.2"]
    _, ref = run(path, tmp_path, capsys, *common, "trainer.strategy=sync", table="fashion_mnist")
    summary, theta = run(path, tmp_path, capsys, *common, "trainer.strategy=model_parallel",
                         "model_parallel.shards=4", "data.partitions=1", table="fashion_mnist")
    assert summary["data"]["train_rows"] // 480 >= 100
    assert np.abs(theta - ref).max() <= 1e-5
    assert summary["max_param_block"] == 196 * summary["model"]["layers"][1]


@pytest.mark.slow
def test_fashion_mnist_vertical_three_parties(spark, fmnist, tmp_path, capsys):
    """Pixel bands in three tables, labels in a fourth, 1% of the ids missing from one party: the
    MLP 784-128-10 with a sharded first layer trains on the 69,300 aligned rows exactly as `sync`
    does on a single table of those rows (float64, to 1e-5: like with like, so the check does not
    depend on float rounding), and the model it reaches is a trained one (an accuracy floor far
    below what it reaches, far above chance)."""
    path, X, y, split = fmnist
    parties = write_parties(spark, path, X, y, split, [(0, 261), (261, 522), (522, 784)], 2, 0.01,
                            seed=2)
    ids = np.arange(len(X), dtype=np.int64) * 3 + 11
    kept = spark.read.format("delta").load(str(path / "band2")).select("id").toArrow()
    keep = np.isin(ids, kept.column("id").to_numpy())
    write_table(spark, path, "aligned", X[keep], y[keep], split[keep], ids[keep])
    common = ["model.kind=mlp", "model.hidden=[128]", "trainer.epochs=1", "trainer.batch_size=1024",
              "trainer.optimizer.lr=0.003", "data.partitions=1"]
    _, ref = run(path, tmp_path, capsys, *common, "trainer.strategy=sync", table="aligned")
    summary, theta = run(path, tmp_path, capsys, *common, "trainer.strategy=model_parallel",
                         *party_sets(parties))
    assert summary["vertical"]["left_out_rows"]["p2"] == 0
    assert summary["vertical"]["left_out_rows"]["owner"] == 700
    assert summary["vertical"]["aligned_rows"] == 69_300
    assert summary["data"]["train_rows"] // 1024 >= 50
    assert np.abs(theta - ref).max() <= 1e-5
    assert summary["test_accuracy"] >= 0.75, summary["test_accuracy"]
