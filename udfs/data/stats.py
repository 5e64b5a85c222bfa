"""Per-client feature statistics: what a client (one partition's block) computes over its own
training-split rows, as sums and counts only, for the driver to combine (pipelines/data/stats.py).

A client never sends a row, a quantile or anything from which one row could be read off: per
feature its count of present values, the sum of the values' deviations from a shift, the sum of
their squares, its count of missing (NaN) values and counts per histogram bin. The shift makes the
combination numerically sound (a variance from raw sums of squares loses every digit when the mean
is large against the spread): in the plain mode it is the client's own mean, so the driver combines
(count, mean, M2) pairwise as Chan, Golub and LeVeque (1979) do; under secure aggregation it is the
midpoint of the declared range, one public number every client subtracts, so that the masked sums
add up. Min and max are only sent in the plain mode (they are not sums).

Sparse blocks (CSR) are summed without densifying: the implicit zeros enter the sums through the
row count, and the histogram through the bin that holds zero.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from udfs.data import blocks
from udfs.federated import secagg
from udfs.federated.clients import client_of
from udfs.federated.secure_clients import MaskedReport, Masking, round_keys


@dataclass(frozen=True)
class ShiftedSums:
    """Per feature: present values, sum of (x - shift), sum of (x - shift)^2, missing values."""

    count: np.ndarray      # int64 [d]
    s1: np.ndarray         # float64 [d]
    s2: np.ndarray         # float64 [d]
    missing: np.ndarray    # int64 [d]


@dataclass(frozen=True)
class ClientMoments:
    """What a client returns in the plain mode's first pass: its sums about its own mean (so
    s1 is ~0 and s2 is its M2), and the smallest and largest present value (NaN when none)."""

    client: int
    sums: ShiftedSums
    shift: np.ndarray      # the client's mean of its present values (0 where none)
    minimum: np.ndarray
    maximum: np.ndarray


@dataclass(frozen=True)
class Bins:
    """A fixed-bin histogram for every feature: `bins` equal bins over [lo, hi] per feature, each
    half-open [a, b) but the last, closed (as numpy.histogram). Values below lo count in the first
    bin, values above hi in the last."""

    lo: np.ndarray         # float64 [d]
    hi: np.ndarray         # float64 [d]
    bins: int

    def inner_edges(self, j: int) -> np.ndarray:
        """The bins - 1 edges between feature j's bins (numpy.histogram's, from linspace)."""
        return np.linspace(self.lo[j], self.hi[j], self.bins + 1)[1:-1]

    @property
    def shift(self) -> np.ndarray:
        """Under secure aggregation, what every client subtracts: the range's midpoint."""
        return (self.lo + self.hi) / 2

    @property
    def half(self) -> np.ndarray:
        """Half the range's width (1 for a range of one point): the unit of the shifted sums."""
        return np.where(self.hi > self.lo, (self.hi - self.lo) / 2, 1.0)


def train_features(path: str) -> np.ndarray | sparse.csr_matrix:
    """The block's training-split features as float64 (its test rows never enter statistics)."""
    block = blocks.load(path)
    rows = np.flatnonzero(~block.test)
    return blocks.rows_of(block.X, rows, "float64")


def shifted_sums(X: np.ndarray | sparse.csr_matrix, shift: np.ndarray) -> ShiftedSums:
    """Sums of each column's present values about `shift`. For CSR the stored values are summed
    and the implicit zeros added through the counts: sum(x - c) = sum(x) - count * c, and
    sum((x - c)^2) = sum(x^2) - 2 c sum(x) + count c^2 (exact for the zeros, whose deviation is -c)."""
    n, d = X.shape
    if isinstance(X, sparse.csr_matrix):
        data, cols = X.data, X.indices
        nan = np.isnan(data)
        missing = np.bincount(cols[nan], minlength=d).astype(np.int64)
        count = n - missing
        vals, at = data[~nan] - shift[cols[~nan]], cols[~nan]
        zeros = (count - np.bincount(at, minlength=d)).astype(np.float64)   # implicit zeros
        s1 = np.bincount(at, weights=vals, minlength=d) - zeros * shift
        s2 = np.bincount(at, weights=vals * vals, minlength=d) + zeros * shift * shift
        return ShiftedSums(count, s1, s2, missing)
    present = ~np.isnan(X)
    dev = np.where(present, X - shift, 0.0)
    count = present.sum(axis=0).astype(np.int64)
    return ShiftedSums(count, dev.sum(axis=0), (dev * dev).sum(axis=0), n - count)


def _extremes(X: np.ndarray | sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest present value per column, NaN where a column has none."""
    d = X.shape[1]
    if isinstance(X, sparse.csr_matrix):
        kept = X.copy()
        kept.data = np.where(np.isnan(kept.data), 0.0, kept.data)
        # a missing entry is not a value, but only a column without rows has no implicit zero
        if X.shape[0] == 0:
            return np.full(d, np.nan), np.full(d, np.nan)
        return kept.min(axis=0).toarray().ravel(), kept.max(axis=0).toarray().ravel()
    present = ~np.isnan(X)
    low = np.where(present, X, np.inf).min(axis=0, initial=np.inf)
    high = np.where(present, X, -np.inf).max(axis=0, initial=-np.inf)
    none = present.sum(axis=0) == 0
    return np.where(none, np.nan, low), np.where(none, np.nan, high)


def moments(client: int, X: np.ndarray | sparse.csr_matrix) -> ClientMoments:
    """The plain mode's first pass over one client's features: sums about its own mean."""
    first = shifted_sums(X, np.zeros(X.shape[1]))
    mean = np.divide(first.s1, first.count, out=np.zeros(X.shape[1]), where=first.count > 0)
    low, high = _extremes(X)
    return ClientMoments(client, shifted_sums(X, mean), mean, low, high)


def histogram(X: np.ndarray | sparse.csr_matrix, bins: Bins) -> np.ndarray:
    """int64 [d, bins] counts of each column's present values in `bins` (clamped at the ends)."""
    n, d = X.shape
    counts = np.zeros((d, bins.bins), dtype=np.int64)
    if isinstance(X, sparse.csr_matrix):
        csc = X.tocsc()
        for j in range(d):
            values = csc.data[csc.indptr[j]:csc.indptr[j + 1]]
            edges = bins.inner_edges(j)
            counts[j] = np.bincount(np.searchsorted(edges, values[~np.isnan(values)], side="right"),
                                    minlength=bins.bins)
            counts[j, np.searchsorted(edges, 0.0, side="right")] += n - len(values)   # implicit zeros
        return counts
    for j in range(d):
        column = X[:, j]
        counts[j] = np.bincount(np.searchsorted(bins.inner_edges(j), column[~np.isnan(column)],
                                                side="right"), minlength=bins.bins)
    return counts


def clipped(X: np.ndarray | sparse.csr_matrix, bins: Bins) -> np.ndarray | sparse.csr_matrix:
    """X with every present value clipped into its column's [lo, hi] (NaN stays NaN)."""
    if isinstance(X, sparse.csr_matrix):
        out = X.copy()
        out.data = np.clip(out.data, bins.lo[out.indices], bins.hi[out.indices])
        return out
    return np.clip(X, bins.lo, bins.hi)


def secure_input(X: np.ndarray | sparse.csr_matrix, bins: Bins) -> np.ndarray:
    """The float64 vector a client masks under secure aggregation: per feature (in blocks of d)
    count, s1 / half, s2 / half^2 (sums about the range's midpoint, in units of its half-width),
    missing, the histogram, and how many values lay outside the range. Values are clipped into the
    declared range first, so every coordinate is within the client's row count: that bounds the
    fixed point (pipelines/data/stats.py)."""
    inside = clipped(X, bins)
    sums = shifted_sums(inside, bins.shift)
    return np.concatenate([sums.count.astype(np.float64), sums.s1 / bins.half,
                           sums.s2 / (bins.half * bins.half), sums.missing.astype(np.float64),
                           histogram(inside, bins).ravel().astype(np.float64),
                           _outside(X, bins).astype(np.float64)])


def _outside(X: np.ndarray | sparse.csr_matrix, bins: Bins) -> np.ndarray:
    """Per column, how many present values lie outside [lo, hi] (zeros of CSR included)."""
    if isinstance(X, sparse.csr_matrix):
        data, cols = X.data, X.indices
        out = np.bincount(cols, weights=(data < bins.lo[cols]) | (data > bins.hi[cols]),
                          minlength=X.shape[1])
        zeros = X.shape[0] - np.bincount(cols, minlength=X.shape[1])
        return out + zeros * ((bins.lo > 0) | (bins.hi < 0))
    with np.errstate(invalid="ignore"):
        return ((X < bins.lo) | (X > bins.hi)).sum(axis=0)


def secure_parts(d: int, bins: int) -> dict[str, slice]:
    """Where each part of secure_input sits in the vector."""
    sizes = {"count": d, "s1": d, "s2": d, "missing": d, "histogram": d * bins, "outside": d}
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = slice(start, start + size)
        start += size
    return parts


def client_moments(rows: Iterable[Any]) -> Iterator[ClientMoments]:
    """runJob function: this partition's client's first-pass sums (plain mode)."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    yield moments(client, train_features(path))


def client_histogram(rows: Iterable[Any], bins: Bins) -> Iterator[tuple[int, np.ndarray]]:
    """runJob function: this partition's client's histogram counts (plain mode's second pass)."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    yield client, histogram(train_features(path), bins)


def masked_stats(rows: Iterable[Any], bins: Bins, masking: Masking) -> Iterator[MaskedReport]:
    """runJob function under secure aggregation: only the masked encoding of secure_input leaves
    the task, so the driver learns nothing but the sums over all clients."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    x = secagg.encode(secure_input(train_features(path), bins), masking.scale, masking.ring_bits)
    yield MaskedReport(client, secagg.mask(round_keys(path, masking.protocol), masking.protocol,
                                           client, masking.public_keys, x, masking.ring_bits))
