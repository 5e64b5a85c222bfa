"""The feature transform a model is trained with: imputation of missing values, then a per-feature
shift and scale (`data.preprocess: standardize | minmax`), then optional missing-indicator columns.

It is fitted on the driver from the federated statistics (pipelines/data/preprocess.py), never from
pooled rows, and applied where features become matrices: while blocks are built (so training,
validation and test rows of a run see the same features, and the block cache keys blocks by it),
and by the scoring functions (score.py, FedsparkModel). It travels in the model's spec.json, so a
table scored later is transformed exactly as the training table was.

A missing value (NaN) with no imputation is an error that names the row and the feature: a NaN
would otherwise turn every loss and gradient it touches into NaN (RAW keeps them: the statistics
count them). Sparse features are scaled
without centring (as scikit-learn's StandardScaler(with_mean=False)): centring would densify them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from udfs.data.errors import BlockError


@dataclass(frozen=True)
class Transform:
    """x -> (fill(x) - shift) / scale per feature, then 0/1 columns `missing` for the raw features
    `indicators`. Empty `shift`/`scale`: no scaling; empty `fill`: a missing value is an error.
    `width`: the raw number of features it was fitted on (None: any, for the identity)."""

    preprocess: str = "none"
    impute: str = "none"
    width: int | None = None
    shift: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    fill: tuple[float, ...] = ()
    indicators: tuple[int, ...] = ()

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.shift, dtype=np.float64), np.asarray(self.scale, dtype=np.float64),
                np.asarray(self.fill, dtype=np.float64))

    def width_out(self, width: int) -> int:
        """Features per row after the transform of rows of `width` features."""
        return width + len(self.indicators)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Transform:
        """The transform a spec.json records (none recorded: the identity, as models saved before
        transforms existed)."""
        if not data:
            return NONE
        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(v) for v in data[key])

        return cls(str(data["preprocess"]), str(data["impute"]),
                   None if data["width"] is None else int(data["width"]), floats("shift"),
                   floats("scale"), floats("fill"), tuple(int(v) for v in data["indicators"]))

    def digest(self) -> str | None:
        """What the block cache's key holds of it (None for the identity)."""
        if self == NONE:
            return None
        return hashlib.sha256(json.dumps(self.to_dict()).encode()).hexdigest()

    def _check_width(self, width: int, ids: np.ndarray) -> None:
        if self.width is not None and width != self.width and len(ids):
            raise BlockError(f"row id {ids[0]}: features has {width} values; the feature transform "
                             f"was fitted on {self.width}")

    def _missing_error(self, row_id: int, feature: int) -> BlockError:
        return BlockError(f"row id {row_id}: feature {feature} is missing (NaN) and data.impute is "
                          "none; set data.impute to mean or zero, or ingest without --allow-missing")

    def apply(self, X: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Dense float32 rows [n, width] -> float32 [n, width_out(width)]; `ids` name bad rows."""
        self._check_width(X.shape[1], ids)
        if self == RAW:
            return X
        missing = np.isnan(X)
        if missing.any() and not self.fill:
            i, j = np.argwhere(missing)[0]
            raise self._missing_error(int(ids[i]), int(j))
        if self == NONE:
            return X
        shift, scale, fill = self._arrays
        out = X.astype(np.float64)
        if self.fill:
            out = np.where(missing, fill, out)
        if self.shift:
            out = (out - shift) / scale
        if self.indicators:
            out = np.hstack([out, missing[:, list(self.indicators)]])
        return out.astype(np.float32)

    def apply_sparse(self, counts: np.ndarray, cols: np.ndarray, vals: np.ndarray, ids: np.ndarray,
                     width: int) -> np.ndarray:
        """The stored values of CSR rows (`counts` per row, column `cols`) transformed: missing
        values filled, then divided by the scale, never shifted."""
        self._check_width(width, ids)
        if self == RAW:
            return vals
        missing = np.isnan(vals)
        if missing.any():
            if not self.fill:
                j = int(np.flatnonzero(missing)[0])
                row = int(np.searchsorted(np.cumsum(counts), j, side="right"))
                raise self._missing_error(int(ids[row]), int(cols[j]))
        if self.indicators:
            raise BlockError("data.missing_indicator is not supported for sparse features")
        if self == NONE:
            return vals
        _, scale, fill = self._arrays
        out = vals.astype(np.float64)
        if self.fill:
            out = np.where(missing, fill[cols], out)
        if self.scale:
            out = out / scale[cols]
        return out.astype(np.float32)


NONE = Transform()
RAW = Transform(impute="keep")   # the features as stored, missing values kept: what statistics read
