"""Byzantine-robust aggregation: small functions from the clients' update vectors (one row each) to
the round's aggregate update, which the server rule (pipelines/federated/server.py) then applies.

* mean          the sample-weighted mean (FedAvg); one bad client can move it anywhere
* median        coordinate-wise median (Yin et al. 2018)
* trimmed_mean  per coordinate, drop the floor(beta*n) largest and smallest values, average the rest
* krum          the update whose n-f-2 nearest neighbours are closest (Blanchard et al. 2017)
* multi_krum    the sample-weighted mean of the n-f updates with the best Krum scores
* norm_bound    scale every update down to L2 norm at most `privacy.clip`, then the weighted mean
                (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"); under secure
                aggregation the clients clip to the same bound themselves

f, the number of Byzantine clients a round tolerates, is `robust.byzantine`, or when that is 0 the
expected number of malicious clients among those sampled; Krum needs n > 2f + 2 (and n >= 3).

Each rule is a function `(updates, counts, settings) -> aggregate` registered by name in RULES, which
robust.rule accepts exactly. `mean` takes the updates as the clients sent them (float32 under
trainer.dtype float32); the others work on them stacked in float64.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipelines.federated.server import weighted_mean

NEEDS_INDIVIDUAL_UPDATES = ("median", "trimmed_mean", "krum", "multi_krum")
KRUM = ("krum", "multi_krum")   # the rules that need f and more than 2f + 2 updates


@dataclass(frozen=True)
class Settings:
    """robust.trim_fraction, the round's f, and the L2 bound of norm_bound (privacy.clip)."""

    trim_fraction: float
    f: int
    bound: float


def _rows(updates: list[np.ndarray]) -> np.ndarray:
    return np.stack(updates).astype(np.float64, copy=False)


def krum_f(n: int, f: int) -> int:
    """A round with too few updates for f (Poisson sampling, dropped clients) runs Krum with the
    largest f it allows."""
    return min(f, max(0, (n - 3) // 2))


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest other updates. A distance
    that is not finite counts as infinite, so a NaN or inf update scores inf and is never chosen."""
    n = len(updates)
    if n <= 2 * f + 2:
        raise ValueError(f"Krum needs more than 2f+2 = {2 * f + 2} updates, got {n} (f={f})")
    with np.errstate(invalid="ignore", over="ignore"):
        sq = np.einsum("ij,ij->i", updates, updates)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * updates @ updates.T, 0.0)
    dist[~np.isfinite(dist)] = np.inf
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :n - f - 2].sum(axis=1)


def mean(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    return weighted_mean(updates, counts)


def median(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    """Coordinate-wise median."""
    return np.median(_rows(updates), axis=0)


def trimmed_mean(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    rows = _rows(updates)
    k = int(math.floor(s.trim_fraction * len(rows)))
    if 2 * k >= len(rows):
        raise ValueError(f"robust.trim_fraction={s.trim_fraction} trims all {len(rows)} updates")
    return np.sort(rows, axis=0)[k:len(rows) - k].mean(axis=0)


def krum_ranking(rows: np.ndarray, f: int) -> np.ndarray:
    """Row indices, best Krum score first; rows that are not finite rank after every finite one."""
    return np.lexsort((krum_scores(rows, f), ~np.isfinite(rows).all(axis=1)))


def krum(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    rows = _rows(updates)
    return rows[int(krum_ranking(rows, krum_f(len(rows), s.f))[0])].copy()


def multi_krum(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    rows = _rows(updates)
    f = krum_f(len(rows), s.f)
    chosen = krum_ranking(rows, f)[:len(rows) - f]
    return weighted_mean([rows[i] for i in chosen], [counts[i] for i in chosen])


def norm_bound(updates: list[np.ndarray], counts: list[int], s: Settings) -> np.ndarray:
    rows = _rows(updates)
    factors = np.minimum(1.0, s.bound / np.maximum(np.linalg.norm(rows, axis=1), 1e-12))
    return weighted_mean(list(rows * factors[:, None]), counts)


Rule = Callable[[list[np.ndarray], list[int], Settings], np.ndarray]
# robust.rule: the config accepts exactly these names, in this order
RULES: dict[str, Rule] = {"mean": mean, "median": median, "trimmed_mean": trimmed_mean, "krum": krum,
                          "multi_krum": multi_krum, "norm_bound": norm_bound}


def aggregate(rule: str, updates: list[np.ndarray], counts: list[int], trim_fraction: float,
              f: int, bound: float = np.inf) -> np.ndarray:
    """The round's aggregate update under `rule` (float64)."""
    if rule not in RULES:
        raise ValueError(f"robust.rule must be one of {tuple(RULES)}, got {rule!r}")
    return RULES[rule](updates, counts, Settings(trim_fraction, f, bound))


def byzantine_count(byzantine: int, malicious_fraction: float, per_round: float) -> int:
    """f for Krum: the configured count, or the expected malicious clients in a round's sample."""
    return byzantine if byzantine > 0 else int(math.ceil(malicious_fraction * per_round))
