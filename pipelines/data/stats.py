"""Federated feature statistics of a training table's train split: per feature count, mean,
variance, missing count and a fixed-bin histogram (plus min and max in the plain mode), combined on
the driver from what each client (partition) computes over its own rows (udfs/data/stats.py): sums
and counts, never rows. Stored in the Delta table `<table>_stats`, one row per feature, keyed by
the table version they describe.

Two modes, as training has:

- plain: each client returns its count, mean and sum of squared deviations (M2) per feature, and
  its min and max; the driver combines them pairwise (Chan, Golub and LeVeque 1979), which keeps
  the variance's digits where a raw sum of squares would cancel them. A second pass counts the
  histogram over [min, max] (or the declared `stats.ranges`).
- `privacy.secure_aggregation`: one pass of the secure-sum protocol (pipelines/federated/
  secure_round.py) over sums about the midpoint of each feature's declared range, so the driver
  learns only the sums over all clients. Min and max are not sums, so they are not reported, and
  the histogram's range must be declared (`stats.ranges`); values outside it are clipped into it
  and counted (`outside`).

The clients are the ones training would use: the federated clients (`trainer.strategy:
federated`), else the `data.partitions` blocks. Variances are the population's (ddof 0, as
scikit-learn's StandardScaler).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import ALL_FEATURES, Config
from pipelines.core.errors import UserError
from pipelines.data import lake
from pipelines.data.blocks import BlockSet, load_blocks
from pipelines.data.direct import BlockCache
from pipelines.federated import secure_round
from pipelines.federated.clients import train_clients
from udfs.data import stats as client_stats
from udfs.data.stats import Bins, ClientMoments
from udfs.data.transform import RAW

STATS_SUFFIX = "_stats"
SCHEMA = pa.schema([
    ("table_version", pa.int64()), ("feature", pa.int32()), ("rows", pa.int64()),
    ("count", pa.int64()), ("missing", pa.int64()), ("mean", pa.float64()),
    ("variance", pa.float64()), ("min", pa.float64()), ("max", pa.float64()),
    ("hist_lo", pa.float64()), ("hist_hi", pa.float64()), ("histogram", pa.list_(pa.int64())),
    ("outside", pa.int64()), ("clients", pa.int32()), ("secure", pa.bool_()),
    ("computed_at", pa.timestamp("us", tz="UTC")),
])


@dataclass
class FeatureStats:
    """The statistics of one table version's train split, feature by feature."""

    table: str
    version: int
    rows: int                      # train-split rows of the clients counted
    count: np.ndarray              # present values per feature
    missing: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    minimum: np.ndarray | None     # None under secure aggregation
    maximum: np.ndarray | None
    bins: Bins
    histogram: np.ndarray          # int64 [d, bins]
    clients: int
    secure: bool
    outside: np.ndarray | None = None   # secure: values clipped into the declared range
    received: list = field(default_factory=list, repr=False)   # what the driver got from the tasks

    @property
    def n_features(self) -> int:
        return len(self.count)

    def summary(self) -> dict:
        """The stats job's summary line: {table, version, rows, features: [...]} (CONTRACT.md)."""
        def value(a: np.ndarray | None, j: int) -> float | None:
            return None if a is None or np.isnan(a[j]) else float(a[j])

        return {"table": self.table, "version": self.version, "rows": self.rows,
                "clients": self.clients, "secure_aggregation": self.secure,
                "features": [{"feature": j, "count": int(self.count[j]), "missing": int(self.missing[j]),
                              "mean": value(self.mean, j), "variance": value(self.variance, j),
                              "min": value(self.minimum, j), "max": value(self.maximum, j)}
                             for j in range(self.n_features)]}


def chan_combine(n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray,
                 mean_b: np.ndarray, m2_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, M2) of two groups from theirs (Chan, Golub and LeVeque's pairwise update):
    the deviations are taken about each group's mean, so nothing large cancels."""
    n = n_a + n_b
    safe = np.where(n > 0, n, 1)
    delta = mean_b - mean_a
    mean = np.where(n > 0, mean_a + delta * n_b / safe, 0.0)
    m2 = m2_a + m2_b + delta * delta * n_a * n_b / safe
    return n, mean, m2


def declared_bins(config: Config, n_features: int, table: str, required: bool) -> Bins | None:
    """The histogram ranges stats.ranges declares for every feature; None when it declares none
    and they are not `required`."""
    ranges = config.stats.ranges
    if not ranges and not required:
        return None
    bad = [k for k in ranges if k != ALL_FEATURES and int(k) >= n_features]
    if bad:
        raise UserError(f"stats.ranges names feature(s) {bad}, but table {table} has {n_features} "
                        f"features (0..{n_features - 1})")
    lo, hi = np.full(n_features, np.nan), np.full(n_features, np.nan)
    if ALL_FEATURES in ranges:
        lo[:], hi[:] = ranges[ALL_FEATURES]
    for key, (low, high) in ranges.items():
        if key != ALL_FEATURES:
            lo[int(key)], hi[int(key)] = low, high
    undeclared = np.flatnonzero(np.isnan(lo))
    if len(undeclared):
        raise UserError(f"stats.ranges declares no range for feature(s) {undeclared[:10].tolist()} "
                        f"of table {table}; under privacy.secure_aggregation every feature needs one "
                        f"(a [lo, hi] per index, or \"{ALL_FEATURES}\": [lo, hi] for all)")
    return Bins(lo, hi, config.stats.bins)


@dataclass
class _Clients:
    """The blocks the statistics run over, the partitions holding rows, and their train rows."""

    blocks: BlockSet
    partitions: list[int]
    rows: int
    n_features: int
    table: str
    version: int


def _clients(spark: SparkSession, config: Config, ref: lake.TableRef) -> _Clients:
    """The train split's blocks as training would build them: the federated clients, or the
    data.partitions blocks (their features as stored: statistics describe the raw features)."""
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"table": ref.name, "version": ref.version})})
    if config.trainer.strategy == "federated":
        c = train_clients(spark, config, RAW)
        return _Clients(c, list(range(c.count)), int(c.sizes.sum()), c.n_features, c.table, c.version)
    b = load_blocks(spark, config.lake.path, ref, config.data.partitions, config.trainer.seed, 0.0,
                    ("train",), config.data.worker_cache_gb, BlockCache.of(config.data), RAW)
    parts = sorted(int(h.part) for h in b.handles.collect())
    return _Clients(b, parts, b.layout.n_train_split, b.n_features, b.table, b.version)


def compute(spark: SparkSession, config: Config, ref: lake.TableRef) -> FeatureStats:
    """The statistics of `ref`'s train split (the latest version when it names none)."""
    c = _clients(spark, config, ref)
    try:
        if config.privacy.secure_aggregation:
            return _secure(spark, config, c)
        return _plain(spark, config, c)
    finally:
        c.blocks.release()


def _plain(spark: SparkSession, config: Config, c: _Clients) -> FeatureStats:
    sc = spark.sparkContext
    name = f"{c.table}@{c.version}"
    first: list[ClientMoments] = c.blocks.run(
        lambda h: sc.runJob(h, client_stats.client_moments, c.partitions))
    d = c.n_features
    n, mean, m2 = np.zeros(d), np.zeros(d), np.zeros(d)
    missing = np.zeros(d, dtype=np.int64)
    for m in first:
        count = m.sums.count.astype(np.float64)
        own = np.where(count > 0, count, 1)
        n, mean, m2 = chan_combine(n, mean, m2, count, m.shift + m.sums.s1 / own,
                                   m.sums.s2 - m.sums.s1 ** 2 / own)
        missing += m.sums.missing
    low = np.nanmin(np.stack([m.minimum for m in first]), axis=0, initial=np.inf)
    high = np.nanmax(np.stack([m.maximum for m in first]), axis=0, initial=-np.inf)
    low, high = np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)
    bins = declared_bins(config, d, name, required=False) or _data_bins(low, high, config.stats.bins)
    counted = c.blocks.run(lambda h: sc.runJob(h, partial(client_stats.client_histogram, bins=bins),
                                               c.partitions))
    histogram = np.asarray(np.sum([h for _, h in counted], axis=0, dtype=np.int64))
    variance = np.where(n > 0, m2 / np.where(n > 0, n, 1), np.nan)
    return FeatureStats(c.table, c.version, c.rows, n.astype(np.int64), missing,
                        np.where(n > 0, mean, np.nan), variance, low, high, bins, histogram,
                        len(first), False, received=[*first, *counted])


def _data_bins(low: np.ndarray, high: np.ndarray, bins: int) -> Bins:
    """Bins over [min, max]; a constant column (or one without values) gets numpy.histogram's
    [x - 0.5, x + 0.5]."""
    low, high = np.nan_to_num(low), np.nan_to_num(high)
    flat = high <= low
    return Bins(np.where(flat, low - 0.5, low), np.where(flat, high + 0.5, high), bins)


def _secure(spark: SparkSession, config: Config, c: _Clients) -> FeatureStats:
    """One secure-sum run: the fixed point is bounded by the clients' rows (every coordinate of a
    client's vector is within its row count, udfs/data/stats.secure_input)."""
    d, p = c.n_features, config.privacy
    bins = declared_bins(config, d, f"{c.table}@{c.version}", required=True)
    assert bins is not None
    summed = c.blocks.run(lambda _: secure_round.run_secure_sum(
        spark.sparkContext, c.blocks, c.partitions, partial(client_stats.masked_stats, bins=bins),
        lambda shared: float(c.rows), p.secagg_threshold, p.ring_bits, "stats"))
    parts = client_stats.secure_parts(d, bins.bins)
    x = summed.total
    n = np.rint(x[parts["count"]])
    safe = np.where(n > 0, n, 1)
    s1, s2 = x[parts["s1"]] * bins.half, x[parts["s2"]] * bins.half ** 2
    mean = np.where(n > 0, bins.shift + s1 / safe, np.nan)
    variance = np.where(n > 0, np.maximum(s2 - s1 * s1 / safe, 0.0) / safe, np.nan)
    histogram = np.rint(x[parts["histogram"]]).astype(np.int64).reshape(d, bins.bins)
    missing = np.rint(x[parts["missing"]]).astype(np.int64)
    rows = int(n[0] + missing[0]) if d else 0
    return FeatureStats(c.table, c.version, rows, n.astype(np.int64), missing, mean, variance, None,
                        None, bins, histogram, len(summed.survivors), True,
                        np.rint(x[parts["outside"]]).astype(np.int64),
                        received=[summed.received])


def stats_table(table: str) -> str:
    return f"{table}{STATS_SUFFIX}"


def write(spark: SparkSession, lake_path: str, stats: FeatureStats) -> int:
    """The statistics as the rows of `<table>_stats` for their table version, replacing any that
    version had (one atomic commit: a re-run leaves one set); returns the commit's version."""
    d = stats.n_features
    now = datetime.datetime.now(datetime.timezone.utc)

    def column(a: np.ndarray | None) -> pa.Array:
        return pa.array([None] * d if a is None else [None if np.isnan(v) else float(v) for v in a],
                        pa.float64())

    table = pa.table({
        "table_version": pa.array([stats.version] * d, pa.int64()),
        "feature": pa.array(np.arange(d, dtype=np.int32)),
        "rows": pa.array([stats.rows] * d, pa.int64()),
        "count": pa.array(stats.count, pa.int64()), "missing": pa.array(stats.missing, pa.int64()),
        "mean": column(stats.mean), "variance": column(stats.variance),
        "min": column(stats.minimum), "max": column(stats.maximum),
        "hist_lo": column(stats.bins.lo), "hist_hi": column(stats.bins.hi),
        "histogram": pa.array([list(map(int, h)) for h in stats.histogram], pa.list_(pa.int64())),
        "outside": pa.array([None] * d if stats.outside is None else stats.outside, pa.int64()),
        "clients": pa.array([stats.clients] * d, pa.int32()),
        "secure": pa.array([stats.secure] * d, pa.bool_()),
        "computed_at": pa.array([now] * d, pa.timestamp("us", tz="UTC")),
    }, schema=SCHEMA)
    path = lake.table_path(lake_path, stats_table(stats.table))
    with lake.arrow_frame(spark, table) as df:
        (df.write.format("delta").mode("overwrite")
         .option("replaceWhere", f"table_version = {int(stats.version)}").save(path))
    return lake.latest_version(spark, path)


def read(spark: SparkSession, lake_path: str, table: str, version: int) -> FeatureStats | None:
    """The stored statistics of `table` at `version`, or None when `<table>_stats` has none."""
    path = lake.table_path(lake_path, stats_table(table))
    if not lake.exists(spark, path):
        return None
    rows = (spark.read.format("delta").load(path).filter(F.col("table_version") == version)
            .orderBy("feature").toArrow())
    if rows.num_rows == 0:
        return None
    col = {name: rows.column(name) for name in rows.column_names}

    def floats(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in col[name].to_pylist()], dtype=np.float64)

    secure = bool(col["secure"][0].as_py())
    hist = np.array(col["histogram"].to_pylist(), dtype=np.int64)
    return FeatureStats(table, version, int(col["rows"][0].as_py()),
                        np.asarray(col["count"], dtype=np.int64), np.asarray(col["missing"], dtype=np.int64),
                        floats("mean"), floats("variance"), None if secure else floats("min"),
                        None if secure else floats("max"),
                        Bins(floats("hist_lo"), floats("hist_hi"), hist.shape[1]), hist,
                        int(col["clients"][0].as_py()), secure,
                        np.asarray(col["outside"], dtype=np.int64) if secure else None)
