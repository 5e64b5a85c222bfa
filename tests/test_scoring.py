"""score.py's mapInArrow scoring: every row's prediction and probabilities belong to its own id, over
several partitions and several Arrow batches each, for dense and sparse feature columns; a bad row
anywhere stops the job with exit 2 naming its id."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines import score
from pipelines.core.cli import main_wrapper
from pipelines.store import artifacts, rundir
from tests.conftest import save_arrow
from udfs.core import models
from udfs.core.models import ModelSpec

ROWS, WIDTH, CLASSES = 600, 9, 4
SPLIT_CONF = {"spark.sql.execution.arrow.maxRecordsPerBatch": "37",   # many batches a partition
              "spark.sql.files.openCostInBytes": "1g"}                # one partition a file


@pytest.fixture()
def small_splits(spark):
    before = {key: spark.conf.get(key) for key in SPLIT_CONF}
    for key, value in SPLIT_CONF.items():
        spark.conf.set(key, value)
    yield
    for key, value in before.items():
        spark.conf.set(key, value)


@pytest.fixture(scope="module")
def data():
    """Features whose row i has id ids[i] (a permutation, so a prediction paired with the wrong
    row or a row's position shows), about half of them zero for the sparse layout."""
    gen = np.random.default_rng(7)
    X = gen.normal(size=(ROWS, WIDTH)).astype(np.float32)
    X[gen.random(X.shape) < 0.5] = 0.0
    return X, gen.permutation(ROWS).astype(np.int64) * 3 + 11


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    spec = ModelSpec.build("mlp", WIDTH, CLASSES, [5])
    theta = models.init_params(spec, np.random.default_rng(3), "glorot_uniform", np.float64)
    path = tmp_path_factory.mktemp("runs") / "scoring-model"
    path.mkdir()
    artifacts.save_model(rundir.open_run(path), spec, theta, {"run_id": path.name, "n_classes": CLASSES})
    return path, spec, theta


def _features(X: np.ndarray, layout: str) -> pa.Array:
    n, d = X.shape
    if layout == "dense":
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32)),
                                        pa.array(X.ravel()))
    rows, cols = np.nonzero(X)
    offsets = pa.array(np.searchsorted(rows, np.arange(n + 1)).astype(np.int32))
    return pa.StructArray.from_arrays(
        [pa.array(np.full(n, d, dtype=np.int32)), pa.ListArray.from_arrays(offsets, pa.array(cols.astype(np.int32))),
         pa.ListArray.from_arrays(offsets, pa.array(X[rows, cols]))], names=["size", "indices", "values"])


PARTS = ((0, 250), (250, 420), (420, ROWS))


def _parts(X: np.ndarray, ids: np.ndarray, layout: str) -> list[pa.Table]:
    return [pa.table({"id": pa.array(ids[lo:hi]), "features": _features(X[lo:hi], layout)})
            for lo, hi in PARTS]


def _write(spark, lake: Path, name: str, parts: list[pa.Table]) -> None:
    """The table as one file a part (one partition each under SPLIT_CONF)."""
    for i, part in enumerate(parts):
        save_arrow(spark, part, str(lake / name), "append" if i else "overwrite")


def _score(lake: Path, model_dir: Path, name: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main_wrapper(score.main, ["--model", str(model_dir), "--input", name, "--output",
                                     f"{name}_scores", "--set", f"lake.path={lake}"])
    captured = capsys.readouterr()
    return code, captured.out if code == 0 else captured.err


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_every_id_gets_its_own_rows_prediction(spark, lake_dir, data, model, small_splits, layout, capsys):
    X, ids = data
    model_dir, spec, theta = model
    _write(spark, lake_dir, layout, _parts(X, ids, layout))
    assert spark.read.format("delta").load(str(lake_dir / layout)).rdd.getNumPartitions() == 3

    code, out = _score(lake_dir, model_dir, layout, capsys)
    assert code == 0, out[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["rows"] == ROWS
    scored = {r.id: r for r in spark.read.format("delta").load(str(lake_dir / f"{layout}_scores")).collect()}
    assert sorted(scored) == sorted(ids)
    order = [scored[i] for i in ids]
    np.testing.assert_array_equal([r.prediction for r in order], models.predict(spec, theta, X))
    np.testing.assert_allclose([r.probability for r in order], models.predict_proba(spec, theta, X),
                               rtol=1e-6)
    assert {r.input_table for r in order} == {layout}


@pytest.mark.parametrize("layout,reason", [
    ("dense", "features has 7 values, expected 9"),
    ("sparse", "features index 9 is outside the declared dimension 9"),
])
def test_a_bad_row_in_a_later_batch_stops_the_job_naming_its_id(spark, lake_dir, data, model, small_splits,
                                                                  layout, reason, capsys):
    """Row 100 of the last part, in its third Arrow batch: first() (the width check) reads a good row."""
    X, ids = data
    parts = _parts(X, ids, layout)
    rows = parts[-1].to_pylist()
    rows[100]["features"] = ([1.0] * (WIDTH - 2) if layout == "dense" else
                             {"size": WIDTH, "indices": [0, WIDTH], "values": [1.0, 2.0]})
    parts[-1] = pa.Table.from_pylist(rows, schema=parts[-1].schema)
    _write(spark, lake_dir, "bad", parts)
    code, err = _score(lake_dir, model[0], "bad", capsys)
    assert code == 2, err[-3000:]
    assert f"row id {rows[100]['id']}: {reason}" in err
    assert not list(lake_dir.glob("bad_scores/_delta_log/*.json"))   # no commit: no table
