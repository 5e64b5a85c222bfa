"""Federated feature statistics (pipelines/stats.py): equal to numpy's over the pooled train rows,
with and without secure aggregation, from what the clients' tasks return (sums and counts only)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.core.config import config_from_dict
from pipelines.data import lake
from pipelines.data import stats as feature_stats
from tests.conftest import write_table
from udfs.data.stats import ClientMoments, secure_parts
from udfs.federated.secure_clients import MaskedReport

BINS = 7


def _table(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 features on different scales (one around 1000 with a small spread, which a raw sum of
    squares would cancel), 5% missing cells in feature 2, 3 classes for the Dirichlet clients."""
    rng = np.random.default_rng(seed)
    n = 900
    X = np.stack([1000 + 3 * rng.normal(size=n), rng.normal(size=n), rng.exponential(2.0, n),
                  rng.uniform(-4, 4, n)], axis=1).astype(np.float32)
    X[rng.random(n) < 0.05, 2] = np.nan
    y = rng.integers(0, 3, n)
    split = np.where(rng.random(n) < 0.2, "test", "train")
    return X, y, split


@pytest.fixture(scope="module")
def stats_lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats-lake")
    X, y, split = _table()
    write_table(spark, path, "feats", X, y, split)
    return path, X[split == "train"].astype(np.float64)


def _config(lake_path, **sets):
    raw: dict[str, dict] = {"lake": {"path": str(lake_path)}, "data": {"table": "feats", "block_cache_gb": 0.0},
           "trainer": {"strategy": "federated"},
           "federated": {"clients": 5, "partitioner": "dirichlet", "alpha": 0.5, "min_clients": 2},
           "stats": {"bins": BINS, "ranges": {}}}
    for key, value in sets.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def _check_moments(stats, pooled):
    np.testing.assert_array_equal(stats.count, (~np.isnan(pooled)).sum(axis=0))
    np.testing.assert_array_equal(stats.missing, np.isnan(pooled).sum(axis=0))
    assert stats.rows == len(pooled)
    np.testing.assert_allclose(stats.mean, np.nanmean(pooled, axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.variance, np.nanvar(pooled, axis=0), rtol=0, atol=1e-9)


def _reference_histogram(pooled, lo, hi):
    return np.stack([np.histogram(col[~np.isnan(col)], bins=BINS, range=(a, b))[0]
                     for col, a, b in zip(pooled.T, lo, hi, strict=True)])


def test_plain_stats_equal_numpy_over_the_pooled_rows(spark, stats_lake):
    path, pooled = stats_lake
    stats = feature_stats.compute(spark, _config(path), lake.TableRef("feats"))
    _check_moments(stats, pooled)
    np.testing.assert_array_equal(stats.minimum, np.nanmin(pooled, axis=0))
    np.testing.assert_array_equal(stats.maximum, np.nanmax(pooled, axis=0))
    np.testing.assert_array_equal(
        stats.histogram, _reference_histogram(pooled, np.nanmin(pooled, 0), np.nanmax(pooled, 0)))
    assert stats.clients == 5 and not stats.secure
    # the Dirichlet clients are uneven: the combination is tested across unequal groups
    sizes = sorted(int(m.sums.count[0] + m.sums.missing[0]) for m in stats.received
                   if isinstance(m, ClientMoments))
    assert sizes[-1] > 2 * sizes[0]
    # what came back from the tasks: per client one record of per-feature sums and extremes, and
    # one [features, bins] count matrix; nothing row-sized
    d = pooled.shape[1]
    for item in stats.received:
        if isinstance(item, ClientMoments):
            arrays = [item.sums.count, item.sums.s1, item.sums.s2, item.sums.missing, item.shift,
                      item.minimum, item.maximum]
            assert all(a.shape == (d,) for a in arrays)
        else:
            client, counts = item
            assert isinstance(client, int) and counts.shape == (d, BINS) and counts.dtype == np.int64
    assert len(stats.received) == 2 * stats.clients


def test_secure_stats_equal_numpy_and_the_driver_sees_only_masked_sums(spark, stats_lake):
    path, pooled = stats_lake
    ranges = {"0": [980.0, 1020.0], "2": [0.0, 30.0], "*": [-6.0, 6.0]}
    config = _config(path, privacy__secure_aggregation=True, stats__ranges=ranges)
    stats = feature_stats.compute(spark, config, lake.TableRef("feats"))
    _check_moments(stats, pooled)
    assert stats.minimum is None and stats.maximum is None and stats.secure
    lo, hi = np.array([980.0, -6.0, 0.0, -6.0]), np.array([1020.0, 6.0, 30.0, 6.0])
    np.testing.assert_array_equal(stats.histogram, _reference_histogram(pooled, lo, hi))
    assert stats.outside is not None and not stats.outside.any()
    (received,) = stats.received
    assert set(received) == {"keys", "sealed", "masked", "answers"}
    d = pooled.shape[1]
    width = secure_parts(d, BINS)["outside"].stop
    for report in received["masked"]:
        assert isinstance(report, MaskedReport) and report.masked.shape == (width,)
        assert report.masked.dtype == np.uint64   # a ring element: the masked encoding, no float


def test_secure_stats_need_a_range_for_every_feature(spark, stats_lake):
    from pipelines.core.errors import UserError

    path, _ = stats_lake
    config = _config(path, privacy__secure_aggregation=True, stats__ranges={"0": [0.0, 1.0]})
    with pytest.raises(UserError, match=r"no range for feature\(s\) \[1, 2, 3\]"):
        feature_stats.compute(spark, config, lake.TableRef("feats"))


def test_stats_job_writes_one_set_per_table_version(spark, stats_lake, tmp_path, capsys):
    from pipelines import stats as stats_job
    from pipelines.core.cli import main_wrapper

    path, pooled = stats_lake
    config_file = tmp_path / "stats.yaml"
    config_file.write_text(json.dumps({"lake": {"path": str(path)}, "data": {"block_cache_gb": 0.0},
                                       "stats": {"bins": BINS}}))
    for _ in range(2):   # a re-run replaces the version's rows
        capsys.readouterr()
        assert main_wrapper(stats_job.main, ["--table", "feats@0", "--config", str(config_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["table"], summary["version"], summary["rows"]) == ("feats", 0, len(pooled))
    assert [f["feature"] for f in summary["features"]] == [0, 1, 2, 3]
    assert summary["features"][2]["missing"] == int(np.isnan(pooled[:, 2]).sum())
    rows = spark.read.format("delta").load(str(path / "feats_stats"))
    assert rows.filter("table_version = 0").count() == 4
    stored = feature_stats.read(spark, str(path), "feats", 0)
    assert stored is not None and stored.minimum is not None
    _check_moments(stored, pooled)
    np.testing.assert_array_equal(stored.minimum, np.nanmin(pooled, axis=0))
    assert feature_stats.read(spark, str(path), "feats", 1) is None
