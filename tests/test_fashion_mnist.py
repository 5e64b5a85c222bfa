"""The seed's sample on the full Fashion-MNIST (slow): ingest the Debian IDX files into Delta, train
the MLP 784-128-10 job with `local`, evaluate the saved model again, and score the table with it."""
from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from pipelines import evaluate, ingest, score, train
from pipelines.core.cli import main_wrapper
from tests.conftest import IDX_DIR, require_fashion_mnist

pytestmark = pytest.mark.slow


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fmnist_lake(spark, tmp_path_factory):
    require_fashion_mnist()
    return tmp_path_factory.mktemp("fmnist-lake")


def test_ingest_fashion_mnist(spark, fmnist_lake, capsys):
    args = ["--source", f"idx:{IDX_DIR}", "--table", "fashion_mnist", "--set", f"lake.path={fmnist_lake}"]
    assert main_wrapper(ingest.main, args) == 0
    first = last_json(capsys)
    assert (first["rows"], first["rejected"], first["version"]) == (70_000, 0, 0)
    df = spark.read.format("delta").load(str(fmnist_lake / "fashion_mnist"))
    stats = df.agg(F.count("*").alias("n"), F.min(F.size("features")).alias("dmin"),
                   F.max(F.size("features")).alias("dmax"), F.min(F.array_min("features")).alias("lo"),
                   F.max(F.array_max("features")).alias("hi"), F.min("label").alias("ymin"),
                   F.max("label").alias("ymax"), F.countDistinct("id").alias("ids")).first()
    assert (stats.n, stats.dmin, stats.dmax, stats.ids) == (70_000, 784, 784, 70_000)
    assert (stats.lo, stats.hi, stats.ymin, stats.ymax) == (0.0, 1.0, 0, 9)
    splits = {r.split: r["count"] for r in df.groupBy("split").count().collect()}
    assert splits == {"train": 60_000, "test": 10_000}
    assert main_wrapper(ingest.main, args) == 0
    again = last_json(capsys)
    assert again["skipped"] and again["version"] == 0


def test_sample_job_trains_and_evaluates(spark, fmnist_lake, tmp_path, capsys):
    if not (fmnist_lake / "fashion_mnist").exists():
        pytest.skip("needs test_ingest_fashion_mnist")
    argv = ["--set", f"lake.path={fmnist_lake}", "--set", f"runs.path={tmp_path}"]
    capsys.readouterr()
    assert main_wrapper(train.main, argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert sum(line.startswith("epoch ") for line in out) == 5
    assert summary["data"]["train_rows"] == 48_000 and summary["data"]["test_rows"] == 10_000
    assert (summary["epochs"], summary["batch_size"]) == (5, 64)
    assert summary["model"]["layers"] == [784, 128, 10]
    assert summary["test_accuracy"] >= 0.85
    assert main_wrapper(evaluate.main, ["--model", summary["run_dir"]]) == 0
    evaluated = last_json(capsys)["test_accuracy"]
    assert evaluated == pytest.approx(summary["test_accuracy"], abs=1e-12)

    # batch scoring on the executors gives the same predictions on the 10,000 test rows
    assert main_wrapper(score.main, ["--model", summary["run_dir"], "--input", "fashion_mnist",
                                     "--output", "fashion_mnist_scores",
                                     "--set", f"lake.path={fmnist_lake}"]) == 0
    assert last_json(capsys)["rows"] == 70_000
    scores = spark.read.format("delta").load(str(fmnist_lake / "fashion_mnist_scores"))
    table = spark.read.format("delta").load(str(fmnist_lake / "fashion_mnist"))
    test = scores.join(table.filter("split = 'test'"), "id")
    agg = test.agg(F.count("*").alias("n"),
                   F.avg((F.col("prediction") == F.col("label")).cast("double")).alias("acc")).first()
    assert agg.n == 10_000 and agg.acc == pytest.approx(evaluated, abs=1e-12)
