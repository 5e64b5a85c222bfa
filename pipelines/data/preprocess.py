"""The feature transform of a run (`data.preprocess`, `data.impute`, `data.missing_indicator`),
fitted from the federated statistics of its pinned table version (pipelines/data/stats.py), so no
row is ever pooled to fit it. The statistics come from `<table>_stats` when it holds that version
in the run's mode (plain, or secure aggregation), else they are computed and stored first.

The fitted transform is the one a scikit-learn user would build from the same rows: imputation
(SimpleImputer's mean or constant 0) before scaling, and the scaling fitted on the imputed column
(StandardScaler, population variance, a zero-variance column left unscaled; MinMaxScaler to
[0, 1]), both derived exactly from the statistics: a column imputed with its mean keeps its mean
and its sum of squared deviations; one imputed with zeros is the pairwise combination of its
present values with a group of zeros. Under secure aggregation min and max are not known: minmax
scales over the declared stats.ranges instead.
"""
from __future__ import annotations

import numpy as np
from pyspark.sql import SparkSession

from pipelines.core.config import Config, DataSection
from pipelines.core.errors import UserError
from pipelines.data import lake
from pipelines.data import stats as feature_stats
from pipelines.data.stats import FeatureStats, chan_combine
from udfs.data.transform import NONE, Transform

# below this a scale counts as zero (scikit-learn's _handle_zeros_in_scale)
TINY_SCALE = 10 * np.finfo(np.float64).eps


def for_run(spark: SparkSession, config: Config) -> Transform:
    """The transform of a run on data.table at data.version (pinned): the identity when the
    config asks for none."""
    if not config.data.transforms:
        return NONE
    table, version = config.data.table, config.data.version
    assert version is not None, "a run's data.version is pinned before its transform is fitted"
    stats = feature_stats.read(spark, config.lake.path, table, version)
    if stats is None or stats.secure != config.privacy.secure_aggregation:
        stats = feature_stats.compute(spark, config, lake.TableRef(table, version))
        feature_stats.write(spark, config.lake.path, stats)
    return fit(stats, config.data)


def fit(stats: FeatureStats, data: DataSection) -> Transform:
    """The transform `data` asks for, from the statistics of the training rows."""
    name = f"{stats.table}@{stats.version}"
    count, missing = stats.count.astype(np.float64), stats.missing.astype(np.float64)
    mean = np.nan_to_num(stats.mean)
    m2 = np.nan_to_num(stats.variance) * count
    low, high = _range(stats)
    if data.impute == "none":
        lacking = np.flatnonzero(stats.missing)
        if len(lacking):
            j = int(lacking[0])
            raise UserError(f"table {name}: feature {j} has {stats.missing[j]} missing value(s) in "
                            f"the train split (and {len(lacking) - 1} other feature(s) have some); "
                            "set data.impute to mean or zero")
        fill: tuple[float, ...] = ()
    elif data.impute == "mean":
        fill = tuple(mean)   # the mean and the sum of squared deviations stay as they are
    else:
        fill = (0.0,) * len(mean)
        _, mean, m2 = chan_combine(count, mean, m2, missing, np.zeros_like(mean), np.zeros_like(mean))
        some = stats.missing > 0
        low, high = np.where(some, np.minimum(low, 0.0), low), np.where(some, np.maximum(high, 0.0), high)
    rows = np.maximum(count + missing, 1.0)
    if data.preprocess == "standardize":
        shift, scale = mean, np.sqrt(m2 / rows)
    elif data.preprocess == "minmax":
        shift, scale = low, high - low
    else:
        shift, scale = np.zeros(0), np.zeros(0)
    scale = np.where(scale < TINY_SCALE, 1.0, scale)
    indicators = tuple(int(j) for j in np.flatnonzero(stats.missing)) if data.missing_indicator else ()
    return Transform(data.preprocess, data.impute, stats.n_features, tuple(map(float, shift)),
                     tuple(map(float, scale)), tuple(map(float, fill)), indicators)


def _range(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's [min, max] (plain mode), or its declared range (secure aggregation)."""
    if stats.minimum is None or stats.maximum is None:
        return stats.bins.lo.copy(), stats.bins.hi.copy()
    return np.nan_to_num(stats.minimum), np.nan_to_num(stats.maximum)
