"""Ways to split a data set into simulated federated clients: each returns one client index per row.

All take the rows' labels (in a fixed row order) and a seeded generator, so the same seed gives the
same clients on any machine.

* iid:       rows shuffled and dealt into equal parts.
* dirichlet: label skew (Hsu et al. 2019): for each label, the clients' shares of its rows are drawn
             from Dirichlet(alpha); small alpha gives clients dominated by a few labels.
* shards:    the pathological split of McMahan et al. 2017: rows sorted by label, cut into
             clients * shards_per_client shards of one label each, each client dealt
             shards_per_client of them (so it holds at most that many labels).
* quantity:  size skew: client sizes proportional to draws from a power law (Pareto, shape alpha),
             rows otherwise iid.

They are registered by name in PARTITIONERS; federated.partitioner accepts those names and COLUMN,
the clients a table column names (pipelines/federated/clients.py reads them; nothing to draw).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

COLUMN = "column"
_MAX_DRAWS = 1000


@dataclass(frozen=True)
class Split:
    """What a partitioner is asked for: the number of clients and the settings some of them take
    (federated.alpha, federated.shards_per_client)."""

    clients: int
    alpha: float
    shards_per_client: int


def iid(labels: np.ndarray, split: Split, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(len(labels), dtype=np.int64)
    for c, rows in enumerate(np.array_split(rng.permutation(len(labels)), split.clients)):
        out[rows] = c
    return out


def dirichlet(labels: np.ndarray, split: Split, rng: np.random.Generator) -> np.ndarray:
    """Redraws (at most a thousand times) until every client has at least one row."""
    clients, alpha = split.clients, split.alpha
    for _ in range(_MAX_DRAWS):
        out = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for c, part in enumerate(np.split(rows, cuts)):
                out[part] = c
        if np.bincount(out, minlength=clients).min() > 0:
            return out
    raise ValueError(f"dirichlet(alpha={alpha}) left a client empty in {_MAX_DRAWS} draws: use fewer "
                     "clients or a larger alpha")


def shards(labels: np.ndarray, split: Split, rng: np.random.Generator) -> np.ndarray:
    """Label-pure shards: each label's rows are cut into a number of shards proportional to its
    share of the rows (largest remainders, at least one), so a client dealt k shards holds at most
    k labels. With equal label counts this is exactly McMahan et al.'s sort-and-cut."""
    clients, per_client = split.clients, split.shards_per_client
    n_shards = clients * per_client
    values, counts = np.unique(labels, return_counts=True)
    if n_shards < len(values) or n_shards > len(labels):
        raise ValueError(f"{clients} clients x {per_client} shards = {n_shards} shards: need at least "
                         f"one per label ({len(values)}) and at most one per row ({len(labels)})")
    exact = n_shards * counts / len(labels)
    per_label = np.maximum(np.floor(exact).astype(np.int64), 1)
    while per_label.sum() < n_shards:
        per_label[np.argmax(exact - per_label)] += 1
    while per_label.sum() > n_shards:
        per_label[np.argmax(np.where(per_label > 1, per_label - exact, -np.inf))] -= 1
    owner = rng.permutation(np.repeat(np.arange(clients), per_client))
    out = np.empty(len(labels), dtype=np.int64)
    shard = 0
    for value, k in zip(values, per_label, strict=False):
        for rows in np.array_split(rng.permutation(np.flatnonzero(labels == value)), k):
            out[rows] = owner[shard]
            shard += 1
    return out


def quantity(labels: np.ndarray, split: Split, rng: np.random.Generator) -> np.ndarray:
    n, clients, alpha = len(labels), split.clients, split.alpha
    if clients > n:
        raise ValueError(f"{clients} clients need at least as many rows, have {n}")
    weights = rng.pareto(alpha, clients) + 1.0
    sizes = 1 + np.floor(weights / weights.sum() * (n - clients)).astype(np.int64)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return np.repeat(np.arange(clients), sizes)[rng.permutation(n)]


Partitioner = Callable[[np.ndarray, Split, np.random.Generator], np.ndarray]
PARTITIONERS: dict[str, Partitioner] = {"iid": iid, "dirichlet": dirichlet, "shards": shards,
                                        "quantity": quantity}
NAMES = (*PARTITIONERS, COLUMN)   # federated.partitioner's allowed values


def assign(kind: str, labels: np.ndarray, clients: int, rng: np.random.Generator, alpha: float,
           shards_per_client: int) -> np.ndarray:
    """Client index of each row for the named partitioner."""
    if kind not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {tuple(PARTITIONERS)}, got {kind!r}")
    return PARTITIONERS[kind](labels, Split(clients, alpha, shards_per_client), rng)
