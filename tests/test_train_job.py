"""The train and evaluate jobs end to end on small real Delta tables: the summary line, the run
directory, evaluation from the stored weights, resume, regression, and scikit-learn as an oracle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession

from pipelines import evaluate, train
from pipelines.core.cli import main_wrapper
from tests.conftest import blobs, write_table

ALWAYS = {"run_id", "run_dir", "strategy", "model", "seed", "data", "batch_size", "epochs",
          "test_loss", "train_seconds", "total_seconds", "model_path"}


@pytest.fixture()
def lake(blobs_lake):
    return blobs_lake


def run_train(lake, runs, capsys, *sets, extra=()):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={runs}", *extra]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    code = main_wrapper(train.main, argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    return json.loads(out[-1]), out


def spark_session() -> SparkSession:
    session = SparkSession.getActiveSession()
    assert session is not None
    return session


BLOBS = ["data.table=blobs", "model.kind=softmax", "trainer.optimizer.lr=0.05", "trainer.epochs=3",
         "trainer.strategy=local"]   # the sample experiment (the default) is sync


def test_summary_line_and_run_directory(lake, tmp_path, capsys):
    summary, out = run_train(lake, tmp_path / "runs", capsys, *BLOBS, "model.kind=mlp",
                             "model.hidden=[16,8]", "trainer.batch_size=32",
                             "spark.conf.spark.hadoop.fs.s3a.secret.key=hunter2")
    assert ALWAYS <= set(summary) and "test_accuracy" in summary
    assert summary["model"] == {"kind": "mlp", "layers": [10, 16, 8, 4]}
    data = summary["data"]
    assert data["table"] == "blobs" and data["version"] == 0 and data["partitions"] == 2
    assert data["train_rows"] + data["validation_rows"] + data["test_rows"] == 10_000
    assert data["validation_rows"] == round(0.2 * (10_000 - data["test_rows"]))
    assert (summary["epochs"], summary["batch_size"], summary["strategy"]) == (3, 32, "local")
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert [line.split()[1] for line in out if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert "val_accuracy" in out[-2]
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    stored = (run_dir / "config.yaml").read_text()   # credentials are never stored in clear
    assert "spark.hadoop.fs.s3a.secret.key: '*********(redacted)'" in stored and "hunter2" not in stored
    recorded = spark_session().read.format("delta").load(str(lake / "runs")).filter(
        f"run_id = '{summary['run_id']}'").select("config").collect()
    assert recorded and all("hunter2" not in r.config for r in recorded)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert summary["model_path"] == str(run_dir / "model")
    spec = json.loads((run_dir / "model" / "spec.json").read_text())
    assert spec["layers"] == [10, 16, 8, 4] and spec["table"] == "blobs"
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        assert z["theta"].shape == (10 * 16 + 16 + 16 * 8 + 8 + 8 * 4 + 4,)
    assert 0 < summary["train_seconds"] < summary["total_seconds"]


def test_evaluate_recomputes_from_the_stored_weights(lake, tmp_path, capsys):
    summary, _ = run_train(lake, tmp_path / "runs", capsys, *BLOBS)
    run_dir = summary["run_dir"]
    assert main_wrapper(evaluate.main, ["--model", run_dir]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert first["test_rows"] == summary["data"]["test_rows"]

    weights = Path(run_dir) / "model" / "weights.npz"
    with np.load(weights, allow_pickle=False) as z:
        theta = z["theta"].copy()
    theta[-4] += 1000.0  # the bias of class 0: now every row is predicted as class 0
    np.savez(weights, theta=theta)
    assert main_wrapper(evaluate.main, ["--model", run_dir]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["test_accuracy"] < first["test_accuracy"] - 0.3


def test_evaluate_rejects_a_missing_model(tmp_path, capsys):
    assert main_wrapper(evaluate.main, ["--model", str(tmp_path / "nope")]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_softmax_regression_matches_scikit_learn(lake, tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    X, y, split = blobs(10_000, 10, 4, seed=11)
    train_rows, test_rows = split == "train", split == "test"
    oracle = LogisticRegression(C=np.inf, max_iter=5000).fit(X[train_rows], y[train_rows])
    expected = oracle.score(X[test_rows], y[test_rows])
    summary, _ = run_train(lake, tmp_path / "runs", capsys, "data.table=blobs",
                           "model.kind=softmax", "data.validation_fraction=0.0",
                           "trainer.optimizer.lr=0.005", "trainer.epochs=20", "trainer.batch_size=256",
                           "trainer.dtype=float64")
    assert abs(summary["test_accuracy"] - expected) <= 0.005, (summary["test_accuracy"], expected)


def test_linear_regression_reports_rmse_and_r2(lake, tmp_path, capsys):
    summary, _ = run_train(lake, tmp_path / "runs", capsys, "data.table=reg", "model.kind=linear",
                           "trainer.optimizer.lr=0.05", "trainer.epochs=10",
                           "trainer.batch_size=16",
                           "data.validation_fraction=0.0")
    assert "test_accuracy" not in summary
    assert summary["test_rmse"] == pytest.approx(0.1, abs=0.03)
    assert summary["test_r2"] > 0.99


def test_classifier_on_real_labels_is_a_clear_error(lake, tmp_path, capsys):
    code = main_wrapper(train.main, ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path}",
                                     "--set", "data.table=reg", "--set", "model.kind=softmax"])
    assert code == 2
    assert "real-valued labels" in capsys.readouterr().err


def test_missing_table_is_a_clear_error(lake, tmp_path, capsys):
    code = main_wrapper(train.main, ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path}",
                                     "--set", "data.table=nosuch"])
    assert code == 2
    assert "table 'nosuch' not found" in capsys.readouterr().err


def test_resume_continues_to_the_same_model(lake, tmp_path, capsys):
    runs = tmp_path / "runs"
    sets = [*BLOBS, "trainer.epochs=3", "trainer.checkpoint_every=1"]
    nightly = ["--run-name", "nightly", "--resume-if-exists"]
    full, _ = run_train(lake, runs, capsys, *sets, extra=nightly)
    run_dir = Path(full["run_dir"])
    assert full["run_id"].startswith("nightly-") and full["run_name"] == "nightly"
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        expected = z["theta"].copy()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch-0001.json", "epoch-0001.npz", "epoch-0002.json", "epoch-0002.npz"]

    # as if the job died during epoch 2: only the first checkpoint survived
    for name in ("summary.json", "epoch-0002.json", "epoch-0002.npz"):
        (run_dir / name if name == "summary.json" else run_dir / "checkpoints" / name).unlink()
    shutil.rmtree(run_dir / "model")
    resumed, out = run_train(lake, runs, capsys, *sets, extra=nightly)
    assert resumed["run_id"] == full["run_id"]
    assert any(line.startswith(f"resuming {run_dir} after epoch 1") for line in out)
    assert [line.split()[1] for line in out if line.startswith("epoch ")] == ["2/3", "3/3"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["theta"], expected)

    # --resume of a finished run reports it again; the next scheduled job starts a new run
    capsys.readouterr()
    assert main_wrapper(train.main, ["--resume", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["run_id"] == full["run_id"]
    again, out = run_train(lake, runs, capsys, *sets, extra=nightly)
    assert again["run_id"] != full["run_id"] and again["run_name"] == "nightly"
    assert [line.split()[1] for line in out if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]


def test_a_resume_reads_the_version_it_started_on_or_stops(spark, tmp_path, capsys):
    """The nightly pattern: train with --resume-if-exists, the job dies, the next ingest writes a
    new version, the job runs again: it finishes on the version it started on, to the weights of
    the uninterrupted run. A pinned version whose files were vacuumed, or a table deleted and
    created again, stops the resume with exit 2."""
    lake, runs = tmp_path / "lake", tmp_path / "runs"
    X, y, split = blobs(2_000, 6, 3, seed=3)
    write_table(spark, lake, "nightly", X, y, split)
    sets = ["data.table=nightly", "model.kind=softmax", "trainer.optimizer.lr=0.05", "trainer.epochs=3",
            "trainer.strategy=local", "trainer.checkpoint_every=1"]
    nightly = ["--run-name", "nightly", "--resume-if-exists"]
    full, _ = run_train(lake, runs, capsys, *sets, extra=nightly)
    run_dir = Path(full["run_dir"])
    assert full["data"]["version"] == 0

    def weights() -> np.ndarray:
        with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
            return z["theta"].copy()

    def die_during_epoch_2() -> None:
        for name in ("summary.json", "checkpoints/epoch-0002.json", "checkpoints/epoch-0002.npz"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "model", ignore_errors=True)

    expected = weights()
    die_during_epoch_2()
    X1, y1, split1 = blobs(2_000, 6, 3, seed=4)
    write_table(spark, lake, "nightly", X1, y1, split1)   # the next ingest: version 1
    resumed, out = run_train(lake, runs, capsys, *sets, extra=nightly)
    assert resumed["run_id"] == full["run_id"] and resumed["data"]["version"] == 0
    assert any(line.startswith(f"resuming {run_dir} after epoch 1") for line in out)
    np.testing.assert_array_equal(weights(), expected)

    def resume_fails() -> str:
        die_during_epoch_2()
        capsys.readouterr()
        argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={runs}", *nightly]
        for s in sets:
            argv += ["--set", s]
        assert main_wrapper(train.main, argv) == 2
        return capsys.readouterr().err

    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sql(f"VACUUM delta.`{lake / 'nightly'}` RETAIN 0 HOURS").collect()
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    err = resume_fails()
    assert "table 'nightly' (version 0, which this run is pinned to) lost" in err and "VACUUM" in err

    shutil.rmtree(lake / "nightly")
    write_table(spark, lake, "nightly", X, y, split)   # the same rows, but another table
    assert "was deleted and created again" in resume_fails()


def test_resume_refuses_a_run_name_that_is_not_one(lake, tmp_path, capsys):
    """--resume reads the run's name from its run.json and locks it: a name that is a path
    ("../../x") is refused before it becomes a lock file's path."""
    runs = tmp_path / "runs"
    full, _ = run_train(lake, runs, capsys, *BLOBS, "trainer.epochs=1")
    run_dir = Path(full["run_dir"])
    (run_dir / "summary.json").unlink()
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "run_name": "../../escaped"}))
    capsys.readouterr()
    assert main_wrapper(train.main, ["--resume", str(run_dir)]) == 2
    assert "its run.json names the run '../../escaped'" in capsys.readouterr().err
    assert not (tmp_path / "escaped.lock").exists() and not (runs / "escaped.lock").exists()
