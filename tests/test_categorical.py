"""Tables as users have them: a CSV with a categorical column and empty numeric cells ingests
without rejecting those cells (--categorical, --allow-missing), trains with data.impute, and a
later file holding a category the training split never had is encoded the training table's way
(--encoding-from: the unseen value takes the "other" slot) and scored."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines import ingest, score
from pipelines.core.cli import main_wrapper
from pipelines.data import lake
from tests.conftest import train_and_load

COLORS = ["red", "green", "blue", "grey", "teal"]


def _rows(rng: np.random.Generator, n: int, colors: list[str]) -> tuple[list[str], np.ndarray]:
    """CSV lines (x0, x1, x2, color, label, split) whose label depends on x0 and the color, with
    5% of the numeric cells empty."""
    X = rng.normal(size=(n, 3))
    color = rng.choice(colors, n)
    y = ((X[:, 0] + np.isin(color, ["red", "blue", "purple"]) * 2.0 - 1.0) > 0).astype(int)
    cells = np.array([[f"{v:.6f}" for v in row] for row in X], dtype=object)
    cells[rng.random(cells.shape) < 0.05] = ""
    split = np.where(rng.random(n) < 0.2, "test", "train")
    lines = [",".join([*row, c, str(label), s]) for row, c, label, s in zip(cells, color, y, split, strict=True)]
    return lines, y


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(["x0,x1,x2,color,label,split", *lines]) + "\n")


def _ingest(capsys, source: Path, table: str, lake_dir: Path, *extra: str) -> dict:
    capsys.readouterr()
    assert main_wrapper(ingest.main, ["--source", f"csv:{source}", "--table", table, "--classes", "2",
                                      "--set", f"lake.path={lake_dir}", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_categorical_and_missing_cells_ingest_train_and_score_a_later_file(spark, tmp_path, capsys):
    rng = np.random.default_rng(4)
    lake_dir = tmp_path / "lake"
    lines, y = _rows(rng, 800, COLORS)
    _write(tmp_path / "train.csv", lines)
    summary = _ingest(capsys, tmp_path / "train.csv", "shop", lake_dir, "--categorical", "color",
                      "--allow-missing")
    assert (summary["rows"], summary["rejected"]) == (800, 0)
    table, _ = lake.read(spark, str(lake_dir), lake.TableRef("shop"))
    first = table.orderBy("id").select("features").toArrow().column("features").to_pylist()
    # 3 numeric features, then blue, green, grey, red, teal (sorted) and "other"
    assert {len(f) for f in first} == {3 + len(COLORS) + 1}
    assert int(sum(np.isnan(np.array(f[:3], dtype=float)).sum() for f in first)) > 0
    # without --allow-missing the same empty cells are rejects, as before
    rejected = _ingest(capsys, tmp_path / "train.csv", "strict", lake_dir, "--categorical", "color")
    assert rejected["rejected"] > 0 and rejected["rows"] + rejected["rejected"] == 800

    run, _ = train_and_load(capsys, [
        "--set", f"lake.path={lake_dir}", "--set", f"runs.path={tmp_path / 'runs'}",
        "--set", "data.table=shop", "--set", "data.impute=mean", "--set", "data.preprocess=standardize",
        "--set", "data.missing_indicator=true", "--set", "data.block_cache_gb=0",
        "--set", "model.kind=logistic", "--set", "trainer.strategy=local", "--set", "trainer.epochs=10",
        "--set", "trainer.optimizer.lr=0.05", "--set", "trainer.batch_size=32"])
    assert run["test_accuracy"] > 0.8
    spec = json.loads((Path(run["model_path"]) / "spec.json").read_text())
    assert spec["encoding"]["categorical"][0]["vocabulary"] == sorted(COLORS)
    assert spec["transform"]["indicators"] == [0, 1, 2]

    later, later_y = _rows(np.random.default_rng(9), 200, [*COLORS, "purple"])
    _write(tmp_path / "later.csv", later)
    scored = _ingest(capsys, tmp_path / "later.csv", "shop_new", lake_dir, "--encoding-from", "shop",
                     "--allow-missing")
    assert (scored["rows"], scored["rejected"]) == (200, 0)
    new, _ = lake.read(spark, str(lake_dir), lake.TableRef("shop_new"))
    rows = new.orderBy("id").select("features").toArrow().column("features").to_pylist()
    purple = np.array([line.split(",")[3] == "purple" for line in later])
    other = np.array([f[-1] for f in rows])
    np.testing.assert_array_equal(other == 1.0, purple)   # the unseen category: "other", no error
    assert main_wrapper(score.main, ["--model", run["run_dir"], "--input", "shop_new", "--output",
                                     "shop_scores", "--set", f"lake.path={lake_dir}"]) == 0
    out = spark.read.format("delta").load(str(lake_dir / "shop_scores")).orderBy("id").toPandas()
    assert len(out) == 200
    seen = ~purple
    accuracy = float((out.prediction.to_numpy()[seen] == later_y[seen]).mean())
    assert accuracy > 0.8
