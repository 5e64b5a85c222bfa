"""From training to use: the runs and metrics Delta tables, runs.py, the plots, batch scoring with
score.py, run names and their lock, sync checkpoints by step, and MLflow."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines import evaluate, runs, score, train
from pipelines.core.cli import main_wrapper
from pipelines.store import locks
from pipelines.store.plots import SERIES_KEY
from tests.conftest import ROOT, blobs, write_table

BLOBS = ["data.table=blobs", "model.kind=softmax", "trainer.optimizer.lr=0.05", "trainer.epochs=3",
         "trainer.strategy=local"]   # the sample experiment (the default) is sync


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """A lake of its own, so the record tables hold only this module's runs."""
    path = tmp_path_factory.mktemp("records_lake")
    X, y, split = blobs(4_000, 10, 4, seed=3)
    write_table(spark, path, "blobs", X, y, split)
    return path


def job(module, argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main_wrapper(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def train_run(lake: Path, runs_path: Path, capsys, *sets: str, name: str | None = None) -> dict:
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={runs_path}"]
    argv += ["--run-name", name] if name else []
    for s in sets:
        argv += ["--set", s]
    code, out, err = job(train, argv, capsys)
    assert code == 0, err[-3000:]
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def trained(lake, tmp_path_factory):
    """One finished local run named `rec`: (summary, runs path)."""
    runs_path = tmp_path_factory.mktemp("runs")
    argv = ["--run-name", "rec", "--set", f"lake.path={lake}", "--set", f"runs.path={runs_path}"]
    for s in BLOBS:
        argv += ["--set", s]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main_wrapper(train.main, argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1]), runs_path


def runs_rows(spark, lake: Path, run_id: str) -> list:
    return (spark.read.format("delta").load(str(lake / "runs")).filter(f"run_id = '{run_id}'")
            .orderBy("attempt", "status").collect())


def metric_rows(spark, lake: Path, run_id: str) -> list:
    return (spark.read.format("delta").load(str(lake / "metrics")).filter(f"run_id = '{run_id}'")
            .orderBy("step", "name").collect())


def test_a_run_appends_its_records(spark, lake, trained):
    summary, _ = trained
    rows = runs_rows(spark, lake, summary["run_id"])
    assert [(r.attempt, r.status) for r in rows] == [(1, "completed"), (1, "running")]
    done = next(r for r in rows if r.status == "completed")
    assert done.run_name == "rec" and done.strategy == "local"
    assert (done.data_table, done.data_version) == ("blobs", 0)
    assert done.model_path == summary["model_path"] and done.ended_at >= done.started_at
    assert done.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "trainer:" in done.config and json.loads(done.summary)["run_id"] == summary["run_id"]

    lines = [json.loads(line) for line in
             (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    got = {(m.step, m.name): m.value for m in metric_rows(spark, lake, summary["run_id"])}
    want = {(r["epoch"], k): v for r in lines for k, v in r.items() if k != "epoch"}
    assert set(got) == set(want) and {n for _, n in got} >= {"train_loss", "val_accuracy"}
    assert all(got[k] == pytest.approx(want[k]) for k in want)


def test_runs_job_lists_and_shows(lake, trained, capsys):
    summary, _ = trained
    code, out, _ = job(runs, ["list", "--set", f"lake.path={lake}"], capsys)
    assert code == 0 and out[0].split()[:3] == ["run_id", "run_name", "status"]
    line = next(line for line in out if line.startswith(summary["run_id"]))
    assert line.split()[1:3] == ["rec", "completed"]
    assert f"test_accuracy={summary['test_accuracy']:.4f}" in line

    code, out, _ = job(runs, ["show", summary["run_id"], "--set", f"lake.path={lake}"], capsys)
    shown = json.loads(out[-1])
    assert code == 0 and shown["status"] == "completed" and shown["metrics"]["unit"] == "epoch"
    assert [s for s, _ in shown["metrics"]["train_loss"]] == [1, 2, 3]
    assert shown["summary"]["test_accuracy"] == summary["test_accuracy"]

    code, _, err = job(runs, ["show", "nosuch", "--set", f"lake.path={lake}"], capsys)
    assert code == 2 and "no run 'nosuch'" in err


def png_series(path: Path) -> dict:
    image = Image.open(path)
    assert isinstance(image, PngImagePlugin.PngImageFile), f"{path} is not a PNG"
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert image.size[0] > 500 and pixels.std() > 10, f"{path} looks blank"
    return json.loads(image.text[SERIES_KEY])


def test_curves_are_drawn_from_the_recorded_metrics(spark, lake, trained):
    summary, _ = trained
    series = png_series(Path(summary["run_dir"]) / "curves.png")
    recorded: dict[str, list] = {}
    for m in metric_rows(spark, lake, summary["run_id"]):
        recorded.setdefault(m.name, []).append([float(m.step), m.value])
    for key in ("train_loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(series[key], recorded[key], rtol=1e-6)


def test_scoring_reproduces_evaluate_and_replaces_its_own_rows(spark, lake, trained, capsys):
    summary, _ = trained
    args = ["--model", summary["run_dir"], "--input", "blobs", "--output", "blobs_scores",
            "--set", f"lake.path={lake}"]
    code, out, err = job(score, args, capsys)
    assert code == 0, err[-3000:]
    first = json.loads(out[-1])
    assert first["model_id"] == summary["run_id"] and first["rows"] == 4_000

    code, out, _ = job(evaluate, ["--model", summary["run_dir"]], capsys)
    expected = json.loads(out[-1])["test_accuracy"]
    scores = spark.read.format("delta").load(str(lake / "blobs_scores"))
    table = spark.read.format("delta").load(str(lake / "blobs"))
    test = scores.join(table.filter("split = 'test'"), "id")
    accuracy = test.selectExpr("avg(cast(prediction = label as double))").first()[0]
    assert accuracy == pytest.approx(expected, abs=1e-9)
    row = scores.first()
    assert len(row.probability) == 4 and sum(row.probability) == pytest.approx(1.0)

    code, out, _ = job(score, args, capsys)  # the same job again: its rows replaced, not added
    again = json.loads(out[-1])
    assert code == 0 and again["output_version"] == first["output_version"] + 1
    assert spark.read.format("delta").load(str(lake / "blobs_scores")).count() == 4_000

    code, out, err = job(score, ["--model", "latest:rec", *args[2:]], capsys)
    assert code == 0, err[-2000:]
    assert json.loads(out[-1])["model_id"] == summary["run_id"]


def test_scoring_bad_input_leaves_the_output_untouched(spark, lake, trained, capsys, tmp_path):
    summary, _ = trained
    X, y, split = blobs(50, 7, 4, seed=1)
    write_table(spark, lake, "narrow", X, y, split)
    write_table(spark, lake, "not_scores", X, y, split)
    base = ["--set", f"lake.path={lake}"]
    version = _version(spark, lake / "not_scores")

    code, _, err = job(score, ["--model", summary["run_dir"], "--input", "narrow", "--output", "x",
                               *base], capsys)
    assert code == 2 and "rows of 7 features; the model expects 10" in err
    assert not (lake / "x").exists()

    code, _, err = job(score, ["--model", str(tmp_path / "nosuch"), "--input", "blobs",
                               "--output", "x", *base], capsys)
    assert code == 2 and "no such run directory" in err
    code, _, err = job(score, ["--model", "latest:never", "--input", "blobs", "--output", "x", *base],
                       capsys)
    assert code == 2 and "no completed run named 'never'" in err

    code, _, err = job(score, ["--model", summary["run_dir"], "--input", "blobs",
                               "--output", "not_scores", *base], capsys)
    assert code == 2 and "exists with another schema" in err
    assert _version(spark, lake / "not_scores") == version


def _version(spark, path: Path) -> int:
    from delta.tables import DeltaTable

    commit = DeltaTable.forPath(spark, str(path)).history(1).first()
    assert commit is not None, f"{path} has no commits"
    return commit["version"]


def test_a_second_job_with_a_running_name_stops(lake, tmp_path, capsys):
    with locks.RunLock(str(tmp_path), "busy"):
        code, _, err = job(train, ["--run-name", "busy", "--set", f"lake.path={lake}",
                                   "--set", f"runs.path={tmp_path}", *sum([["--set", s] for s in BLOBS], [])],
                           capsys)
    assert code == 2 and "run name 'busy' is in use" in err and f"pid {__import__('os').getpid()}" in err
    assert not list(tmp_path.glob("busy-*"))


def test_sync_resumes_from_a_step_checkpoint_without_duplicate_records(spark, lake, tmp_path, capsys):
    sets = [*BLOBS, "trainer.strategy=sync", "trainer.batch_size=256", "trainer.epochs=2",
            "trainer.checkpoint_every=5", "trainer.dtype=float64"]
    full = train_run(lake, tmp_path / "a", capsys, *sets, name="steps")
    run_dir = Path(full["run_dir"])
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        expected = z["theta"].copy()
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json"))
    assert steps and steps[0] == 5 and all(b - a == 5 for a, b in zip(steps, steps[1:], strict=False))

    # as if the job died after the first checkpoint of epoch 2 (mid-epoch)
    steps_per_epoch = -(-full["data"]["train_rows"] // 256)
    keep = next(s for s in steps if s > steps_per_epoch)
    for s in steps:
        if s > keep:
            for ext in ("json", "npz"):
                (run_dir / "checkpoints" / f"step-{s:04d}.{ext}").unlink()
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    code, out, err = job(train, ["--run-name", "steps", "--resume-if-exists",
                                 "--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'a'}",
                                 *sum([["--set", s] for s in sets], [])], capsys)
    assert code == 0, err[-3000:]
    assert any(line.startswith(f"resuming {run_dir} after epoch 1, step {keep}") for line in out)
    with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["theta"], expected)
    resumed = json.loads(out[-1])
    assert resumed["test_accuracy"] == full["test_accuracy"]

    rows = runs_rows(spark, lake, full["run_id"])
    assert sorted((r.attempt, r.status) for r in rows) == [
        (1, "completed"), (1, "running"), (2, "completed"), (2, "running")]
    metrics = metric_rows(spark, lake, full["run_id"])
    keys = [(m.step, m.name) for m in metrics]
    assert len(keys) == len(set(keys)) and {s for s, _ in keys} == {1, 2}


def test_federated_runs_plot_their_clients(spark, lake, tmp_path, capsys):
    write_table(spark, lake, "fed", *blobs(1_200, 10, 4, seed=8))
    summary = train_run(lake, tmp_path, capsys, "data.table=fed", "model.kind=softmax",
                        "trainer.strategy=federated", "federated.clients=8", "federated.fraction=0.5",
                        "federated.rounds=3", "federated.local_epochs=1",
                        "trainer.optimizer.lr=0.05", "trainer.optimizer.name=sgd")
    series = png_series(Path(summary["run_dir"]) / "clients.png")
    assert sum(series["histogram"]["counts"]) == 8
    recorded = {(m.step, m.name): m.value for m in metric_rows(spark, lake, summary["run_id"])}
    per_client = [v for (step, name), v in recorded.items()
                  if step == 3 and name.startswith("client_accuracies/")]
    assert len(per_client) == 8
    assert np.mean(per_client) == pytest.approx(recorded[(3, "client_accuracy.mean")])
    np.testing.assert_allclose([y for _, y in series["client_accuracy.min"]],
                               [recorded[(r, "client_accuracy.min")] for r in (1, 2, 3)])
    assert png_series(Path(summary["run_dir"]) / "curves.png")["test_accuracy"][-1][1] == \
        pytest.approx(summary["test_accuracy"])


def test_mlflow_gets_params_metrics_and_the_model(lake, tmp_path, capsys, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = train_run(lake, tmp_path, capsys, *BLOBS, "trainer.epochs=2", "tracking.mlflow=true")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    found = client.search_runs([client.get_experiment_by_name("fedspark").experiment_id],
                               f"tags.`fedspark.run_id` = '{summary['run_id']}'")
    assert len(found) == 1
    run = found[0]
    assert run.data.params["trainer.epochs"] == "2"
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert files == {"model/weights.npz", "model/spec.json"}



@pytest.mark.slow  # two JVMs of their own
def test_two_jobs_at_once_both_land_in_the_records(spark, lake, tmp_path):
    """Two spark-submit processes started together append to the same runs and metrics tables."""
    import os
    import subprocess
    import sys

    from pipelines.core.session import submit_args

    spark_submit = Path(sys.executable).with_name("spark-submit")
    procs = []
    for name in ("twin_a", "twin_b"):
        argv = [str(spark_submit), *submit_args(), "--master", "local[1]", "pipelines/train.py",
                "--run-name", name, "--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path}",
                *sum([["--set", s] for s in (*BLOBS, "trainer.epochs=2")], [])]
        procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, "PYSPARK_PYTHON": sys.executable}))
    summaries = []
    for proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    for summary in summaries:
        rows = runs_rows(spark, lake, summary["run_id"])
        assert sorted(r.status for r in rows) == ["completed", "running"]
        assert {m.step for m in metric_rows(spark, lake, summary["run_id"])} == {1, 2}


def test_progress_reports_tasks_and_an_eta(spark, capsys):
    from pipelines.core.progress import progress

    sc = spark.sparkContext
    capsys.readouterr()
    with progress(sc, "slow step", tag="run t", every=0.3):
        # a local function: cloudpickle ships it by value (executors cannot import this test module)
        def slow(x: int) -> int:
            time.sleep(0.4)
            return x

        assert sc.parallelize(range(8), 8).map(slow).sum() == 28
    lines = capsys.readouterr().out.splitlines()
    reports = [line for line in lines if line.startswith("slow step: ") and "tasks" in line]
    assert reports and all(line.endswith("[run t]") for line in lines)
    done = [int(line.split()[2].split("/")[0]) for line in reports]
    assert done == sorted(done) and all(line.split()[2].endswith("/8") for line in reports)
    assert any("eta 0:0" in line for line in reports)
    assert lines[-1].startswith("slow step: done in ")
