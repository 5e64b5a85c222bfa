"""One local SparkSession with Delta for the whole test session, and helpers that write small real
Delta training tables."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian's dataset-fashion-mnist (scripts/setup.sh)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    os.environ.setdefault("PYSPARK_PYTHON", str(Path(sys.executable)))
    # the block cache's default root (data.block_cache: null) for this session's executors and
    # jobs, not the user's ~/.cache: tests start from an empty cache and leave nothing behind
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    from pipelines.core.session import build_session

    # 2 GiB: the whole suite shares this JVM, and the full Fashion-MNIST ingest needs more than
    # the 1 GiB default once earlier tests have cached their tables
    # no web UI: the suite runs thousands of small jobs, and nothing reads the UI (the status
    # tracker the progress lines use works without it)
    session = build_session("fedspark-tests", {"spark.master": "local[2]",
                                               "spark.driver.memory": "2g",
                                               "spark.sql.shuffle.partitions": "4",
                                               "spark.ui.enabled": "false"})
    yield session
    session.stop()


@pytest.fixture()
def lake_dir(tmp_path: Path) -> Path:
    path = tmp_path / "lake"
    path.mkdir()
    return path


def save_arrow(spark, table, path: str, mode: str = "overwrite") -> None:
    """Write an Arrow table as a Delta table at `path`, its data shipped by broadcast (no task over
    Spark's recommended size)."""
    from pipelines.data.lake import arrow_frame

    with arrow_frame(spark, table) as df:
        df.write.format("delta").mode(mode).option("overwriteSchema", "true").save(path)


def write_table(spark, lake: Path, name: str, X: np.ndarray, y: np.ndarray,
                split: np.ndarray | None = None, ids: np.ndarray | None = None) -> str:
    """Write a training table (id, features array<float>, label, split) as a Delta table."""
    import pyarrow as pa

    n, d = X.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    split = np.array(["train"] * n) if split is None else split
    label = pa.array(y.astype(np.int32)) if y.dtype.kind in "iu" else pa.array(y.astype(np.float64))
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    table = pa.table({
        "id": pa.array(ids),
        "features": pa.ListArray.from_arrays(offsets, pa.array(X.astype(np.float32).ravel())),
        "label": label,
        "split": pa.array(split.tolist()),
    })
    path = str(lake / name)
    save_arrow(spark, table, path)
    return path


def require_fashion_mnist() -> None:
    if not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{IDX_DIR} has no Fashion-MNIST: scripts/test.sh installs dataset-fashion-mnist")


def fashion_mnist(every: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as (X float32 [n, 784] scaled to [0, 1], y int32, split), train then test,
    taking every `every`-th image of each split."""
    from pipelines.data import idx

    require_fashion_mnist()
    parts = [idx.read_split(IDX_DIR, s) for s in ("train", "test")]
    X = np.concatenate([p[0][::every] for p in parts]).astype(np.float32) / np.float32(255)
    y = np.concatenate([p[1][::every] for p in parts]).astype(np.int32)
    split = np.array([s for s, p in zip(("train", "test"), parts, strict=False) for _ in p[1][::every]])
    return X.reshape(len(y), -1), y, split


def blobs(n, d, k, seed, spread=1.0):
    """Overlapping Gaussian classes: not separable, so logistic regression has one finite optimum."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(k, d))
    y = rng.integers(0, k, n)
    X = means[y] + rng.normal(size=(n, d))
    split = np.where(rng.random(n) < 0.2, "test", "train")
    return X.astype(np.float32), y, split


@pytest.fixture(scope="session")
def blobs_lake(spark, tmp_path_factory):
    """Tables `blobs` (4 overlapping classes) and `reg` (linear regression), shared by the train-job
    and mllib tests."""
    path = tmp_path_factory.mktemp("lake")
    X, y, split = blobs(10_000, 10, 4, seed=11)
    write_table(spark, path, "blobs", X, y, split)
    rng = np.random.default_rng(5)
    Xr = rng.normal(size=(800, 5)).astype(np.float32)
    yr = Xr @ np.array([1.5, -2.0, 0.5, 0.0, 3.0]) + 0.7 + 0.1 * rng.normal(size=800)
    write_table(spark, path, "reg", Xr, yr, np.where(rng.random(800) < 0.25, "test", "train"))
    return path


def train_and_load(capsys, argv: list[str], sets=(), wire_log: list | None = None
                   ) -> tuple[dict, np.ndarray]:
    """Run train.py in this process with `argv` plus one `--set` per item of `sets`: its summary and
    the saved weights. `wire_log`: a list to record a model_parallel run's wire in (train.main)."""
    import json
    from functools import partial

    from pipelines import train
    from pipelines.core.cli import main_wrapper

    for s in sets:
        argv = [*argv, "--set", s]
    capsys.readouterr()
    assert main_wrapper(partial(train.main, wire_log=wire_log), argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(f"{summary['model_path']}/weights.npz", allow_pickle=False) as z:
        return summary, z["theta"]
