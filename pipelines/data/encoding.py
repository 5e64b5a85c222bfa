"""Categorical columns at ingest (`--categorical COL,...`): each becomes a block of 0/1 features
after the numeric ones, one-hot over a vocabulary drawn from the training split with one "other"
slot for a value the vocabulary lacks (an unseen category, or an empty cell: never an error), or,
with `--hash-buckets N`, one of N slots by a hash of the value (for high cardinality, no
vocabulary).

The encoding is stored in the ingest commit's metadata (pipelines/data/sources.py), copied into a
model trained on the table (spec.json), and reused by `--encoding-from TABLE` so that a table
ingested later (the rows to score) is encoded exactly as the training table was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.core.errors import UserError

CATEGORY_PREFIX = "_category_"   # the good rows' column holding a categorical cell
OTHER = "<other>"


@dataclass(frozen=True)
class CategoricalColumn:
    """One categorical column: one-hot over `vocabulary` plus "other", or `buckets` hashed slots."""

    column: str
    vocabulary: tuple[str, ...] | None = None
    buckets: int | None = None

    @property
    def width(self) -> int:
        return len(self.vocabulary) + 1 if self.vocabulary is not None else int(self.buckets or 0)

    def names(self) -> list[str]:
        """The features' names: COL=VALUE per slot (COL=<other> last), or COL#BUCKET."""
        if self.vocabulary is not None:
            return [f"{self.column}={v}" for v in (*self.vocabulary, OTHER)]
        return [f"{self.column}#{b}" for b in range(self.width)]

    def slot(self, value: Column) -> Column:
        """The slot of a (trimmed, empty as null) cell."""
        if self.vocabulary is None:
            return F.pmod(F.xxhash64(F.coalesce(value, F.lit(""))), F.lit(self.width)).cast("int")
        other = F.lit(len(self.vocabulary))
        if not self.vocabulary:
            return other
        position = F.array_position(F.array(*[F.lit(v) for v in self.vocabulary]), value)
        return F.when(value.isNull() | (position == 0), other).otherwise(position - 1).cast("int")

    def one_hot(self, value: Column) -> Column:
        slot = self.slot(value)
        return F.transform(F.sequence(F.lit(0), F.lit(self.width - 1)),
                           lambda j: F.when(j == slot, F.lit(1.0)).otherwise(F.lit(0.0)).cast("float"))


@dataclass(frozen=True)
class Encoding:
    """How a table's features were made: its numeric columns (features 0..n-1, in order), then
    each categorical column's block."""

    numeric: tuple[str, ...]
    categorical: tuple[CategoricalColumn, ...]

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(c.width for c in self.categorical)

    def feature_names(self) -> list[str]:
        return [*self.numeric, *(n for c in self.categorical for n in c.names())]

    def apply(self, good: DataFrame) -> DataFrame:
        """The good rows with every categorical block appended to `features`."""
        blocks = [c.one_hot(F.col(CATEGORY_PREFIX + c.column)) for c in self.categorical]
        out = good.withColumn("features", F.concat(F.col("features"), *blocks)) if blocks else good
        return out.drop(*[CATEGORY_PREFIX + c.column for c in self.categorical])

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": list(self.numeric), "categorical": [
            {"column": c.column, "vocabulary": None if c.vocabulary is None else list(c.vocabulary),
             "buckets": c.buckets} for c in self.categorical]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Encoding:
        return cls(tuple(data["numeric"]), tuple(
            CategoricalColumn(c["column"], None if c["vocabulary"] is None else tuple(c["vocabulary"]),
                              c["buckets"]) for c in data["categorical"]))


def cell(value: Column) -> Column:
    """A categorical cell as the encoding reads it: trimmed text, an empty cell as null."""
    text = F.trim(value.cast("string"))
    return F.when(text != "", text)


def fit(good: DataFrame, numeric: list[str], columns: list[str], buckets: int | None) -> Encoding:
    """The encoding of `columns` from the good rows: the sorted distinct values of each in the
    train split (one small job per column), or `buckets` hashed slots."""
    if buckets is not None:
        return Encoding(tuple(numeric), tuple(CategoricalColumn(c, None, buckets) for c in columns))
    train = good.filter(F.col("split") == "train")
    found = []
    for column in columns:
        values = train.select(F.col(CATEGORY_PREFIX + column).alias("v")).where("v is not null").distinct()
        found.append(CategoricalColumn(column, tuple(sorted(r.v for r in values.collect()))))
    return Encoding(tuple(numeric), tuple(found))


def check_reused(encoding: Encoding, numeric: list[str], columns: list[str], source: str,
                 table: str) -> None:
    """A source encoded with another table's encoding must have that table's columns."""
    if list(encoding.numeric) != numeric:
        raise UserError(f"{source}: numeric feature columns {numeric} differ from those of table "
                        f"{table!r} (--encoding-from), {list(encoding.numeric)}")
    theirs = [c.column for c in encoding.categorical]
    if columns and columns != theirs:
        raise UserError(f"{source}: --categorical {','.join(columns)} differs from table {table!r}'s "
                        f"categorical columns {theirs} (--encoding-from)")
