"""Vertical federated data: parties that hold different columns of the same rows.

`model_parallel.parties` maps a party name to its Delta table and the global feature columns it
holds, as a half-open range:

    model_parallel:
      parties:
        bank:   {table: bank_features, columns: [0, 300]}
        shop:   {table: shop_features, columns: [300, 784]}
        labels: {table: outcomes}           # the label party: id, label, split
      label_party: labels

Every table is keyed by a shared `id`. The columns of all parties must cover 0..d-1 exactly once.
Rows present in every table are used (the id intersection, what private set intersection would
give each party); how many rows of each table are left out is reported. The label party's `split`
says which aligned ids are test rows; each feature party's features become one feature block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import reduce
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import ConfigError, ModelParallelSection
from pipelines.core.errors import UserError
from pipelines.data import lake

TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Party:
    name: str
    table: str
    columns: tuple[int, int] | None     # [lo, hi) of the global features, None for labels only

    @property
    def span(self) -> tuple[int, int]:
        """[lo, hi) of a feature party's columns; a ValueError for a party that holds none."""
        if self.columns is None:
            raise ValueError(f"party {self.name!r} holds no feature columns")
        return self.columns


@dataclass(frozen=True)
class Parties:
    features: tuple[Party, ...]         # in column order: feature block s is features[s]
    label: Party

    @property
    def n_features(self) -> int:
        return self.features[-1].span[1]

    @property
    def bounds(self) -> tuple[int, ...]:
        return (0, *(p.span[1] for p in self.features))

    @property
    def all(self) -> tuple[Party, ...]:
        return self.features + (() if self.label in self.features else (self.label,))


def _party(name: str, entry: Any) -> Party:
    key = f"model_parallel.parties.{name}"
    if not isinstance(entry, dict) or set(entry) - {"table", "columns"} or "table" not in entry:
        raise ConfigError(f"{key}: expected {{table: NAME, columns: [first, stop]}} (columns may be "
                          f"left out for the label party), got {entry!r}")
    if not isinstance(entry["table"], str) or not TABLE_NAME.match(entry["table"]):
        raise ConfigError(f"{key}.table: {entry['table']!r} is not a table name")
    cols = entry.get("columns")
    if cols is None:
        return Party(name, entry["table"], None)
    if (not isinstance(cols, list) or len(cols) != 2 or not all(isinstance(c, int) for c in cols)
            or not 0 <= cols[0] < cols[1]):
        raise ConfigError(f"{key}.columns: expected [first, stop) with 0 <= first < stop, got {cols!r}")
    return Party(name, entry["table"], (cols[0], cols[1]))


def parse(mp: ModelParallelSection) -> Parties | None:
    """The parties of a vertical run, None when there are none (a single table); a ConfigError
    for no label party, a party without columns besides it, or columns unassigned or assigned twice."""
    if not mp.parties:
        if mp.label_party is not None:
            raise ConfigError("model_parallel.label_party is set but model_parallel.parties is empty")
        return None
    parties = [_party(str(name), entry) for name, entry in mp.parties.items()]
    names = [p.name for p in parties]
    if mp.label_party is None:
        raise ConfigError(f"model_parallel.parties needs a label party: set model_parallel.label_party "
                          f"to one of {names}")
    if mp.label_party not in names:
        raise ConfigError(f"model_parallel.label_party={mp.label_party!r} is not one of the parties "
                          f"{names}")
    label = parties[names.index(mp.label_party)]
    loose = [p.name for p in parties if p.columns is None and p is not label]
    if loose:
        raise ConfigError(f"model_parallel.parties: {loose} hold no columns; only the label party "
                          "may leave out `columns`")
    features = sorted((p for p in parties if p.columns), key=lambda p: p.span)
    if not features:
        raise ConfigError("model_parallel.parties: no party holds feature columns")
    _check_cover(features)
    return Parties(tuple(features), label)


def _check_cover(features: list[Party]) -> None:
    """Every column 0..d-1 held by exactly one party."""
    expected = 0
    prev: Party | None = None
    for party in features:
        lo, hi = party.span
        if lo > expected:
            raise ConfigError(f"model_parallel.parties: columns {expected}..{lo - 1} are assigned to no "
                              f"party (party {party.name!r} starts at {lo})")
        if lo < expected:
            assert prev is not None  # expected is 0 before the first party, and lo >= 0
            raise ConfigError(f"model_parallel.parties: columns {lo}..{min(hi, expected) - 1} are "
                              f"assigned twice (parties {prev.name!r} and {party.name!r})")
        expected = hi
        prev = party


def _columns(df: DataFrame, party: Party, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(f"party {party.name!r}: table {party.table!r} has no column(s) {missing} "
                        f"(a party table needs {list(needed)}); its columns are {df.columns}")


def read(spark: SparkSession, lake_path: str, parties: Parties) -> tuple[dict[str, DataFrame], dict[str, int]]:
    """Each party's table (latest version) with its columns checked, and the versions read."""
    frames, versions = {}, {}
    for party in parties.all:
        df, versions[party.name] = lake.read(spark, lake_path, lake.TableRef(party.table))
        needed: tuple[str, ...] = ("id",)
        if party.columns:
            needed += ("features",) if "indices" not in df.columns else ("indices", "values")
        if party is parties.label:
            needed += ("label", "split")
        _columns(df, party, needed)
        dupes = df.groupBy("id").count().filter("count > 1").limit(1).collect()
        if dupes:
            raise UserError(f"party {party.name!r}: table {party.table!r} holds id {dupes[0]['id']} "
                            f"{dupes[0]['count']} times; ids must be unique")
        frames[party.name] = df
    return frames, versions


def align(frames: dict[str, DataFrame]) -> tuple[DataFrame, dict[str, int], int]:
    """The ids present in every party's table, each table's rows left out, and the aligned count."""
    ids = reduce(lambda a, b: a.join(b, "id"),
                 [df.select(F.col("id").cast("long").alias("id")) for df in frames.values()]).cache()
    aligned = ids.count()
    left_out = {name: df.count() - aligned for name, df in frames.items()}
    if not aligned:
        raise UserError(f"the parties' tables {sorted(frames)} share no id")
    return ids, left_out, aligned
