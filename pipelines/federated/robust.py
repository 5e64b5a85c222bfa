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
"""
from __future__ import annotations

import math

import numpy as np

from pipelines.federated.server import weighted_mean

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")
NEEDS_INDIVIDUAL_UPDATES = ("median", "trimmed_mean", "krum", "multi_krum")


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    return np.median(updates, axis=0)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    k = int(math.floor(beta * len(updates)))
    if 2 * k >= len(updates):
        raise ValueError(f"robust.trim_fraction={beta} trims all {len(updates)} updates")
    ordered = np.sort(updates, axis=0)
    return ordered[k:len(updates) - k].mean(axis=0)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest other updates."""
    n = len(updates)
    if n <= 2 * f + 2:
        raise ValueError(f"Krum needs more than 2f+2 = {2 * f + 2} updates, got {n} (f={f})")
    sq = np.einsum("ij,ij->i", updates, updates)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * updates @ updates.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :n - f - 2].sum(axis=1)


def krum(updates: np.ndarray, f: int) -> np.ndarray:
    return updates[int(np.argmin(krum_scores(updates, f)))].copy()


def multi_krum(updates: np.ndarray, counts: list[int], f: int) -> np.ndarray:
    chosen = np.argsort(krum_scores(updates, f), kind="stable")[:len(updates) - f]
    return weighted_mean([updates[i] for i in chosen], [counts[i] for i in chosen])


def norm_bound(updates: np.ndarray, counts: list[int], bound: float) -> np.ndarray:
    norms = np.linalg.norm(updates, axis=1)
    factors = np.minimum(1.0, bound / np.maximum(norms, 1e-12))
    return weighted_mean(list(updates * factors[:, None]), counts)


def aggregate(rule: str, updates: list[np.ndarray], counts: list[int], trim_fraction: float,
              f: int, bound: float = np.inf) -> np.ndarray:
    """The round's aggregate update under `rule` (float64). A round with too few updates for f
    (Poisson sampling, dropped clients) runs Krum with the largest f it allows."""
    if rule == "mean":
        return weighted_mean(updates, counts)
    stacked = np.stack(updates).astype(np.float64, copy=False)
    if rule == "median":
        return coordinate_median(stacked)
    if rule == "trimmed_mean":
        return trimmed_mean(stacked, trim_fraction)
    if rule in ("krum", "multi_krum"):
        f = min(f, max(0, (len(stacked) - 3) // 2))
        return krum(stacked, f) if rule == "krum" else multi_krum(stacked, counts, f)
    if rule == "norm_bound":
        return norm_bound(stacked, counts, bound)
    raise ValueError(f"robust.rule must be one of {RULES}, got {rule!r}")


def byzantine_count(byzantine: int, malicious_fraction: float, per_round: float) -> int:
    """f for Krum: the configured count, or the expected malicious clients in a round's sample."""
    return byzantine if byzantine > 0 else int(math.ceil(malicious_fraction * per_round))
