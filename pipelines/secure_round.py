"""A federated round under secure aggregation: four Spark jobs over the sampled clients' partitions
(advertise keys, share keys, train and mask, unmask), with the driver relaying public keys and
sealed shares and learning only sums (pipelines/secagg.py, udfs/secure_clients.py).

The fixed-point scale is chosen from what the driver already knows, the sampled clients' row counts
and the clip, so that the weighted sum of all of them cannot overflow the ring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np
from pyspark import SparkContext

from pipelines import secagg
from udfs import secure_clients
from udfs.clients import ClientRound
from udfs.secagg import SecAggError

if TYPE_CHECKING:
    from pipelines.federated import Clients


@dataclass(frozen=True)
class Phases:
    """The client steps; a test swaps one to make clients drop at a chosen point."""

    advertise: Callable = secure_clients.advertise
    share_keys: Callable = secure_clients.share_keys
    masked_update: Callable = secure_clients.masked_update
    unmask_shares: Callable = secure_clients.unmask_shares


@dataclass
class SecureResult:
    """What the driver learns from a secure round: sums over the surviving clients only."""

    weighted_sum: np.ndarray        # sum of weight * update
    weight_sum: float
    within_clip: float              # how many survivors' updates were within the clip
    reports: list[dict]             # per survivor: client, n, train_loss, seconds (no update)
    dropped: list[dict]
    threshold: int
    scale: float                    # the fixed-point scale the clients encoded with
    bytes_up: int
    received: dict = field(default_factory=dict)   # everything the driver received, by step


def _job(sc: SparkContext, c: Clients, step: Callable, partitions: list[int]) -> list:
    return sc.runJob(c.handles, step, sorted(partitions)) if partitions else []


def run_secure_round(sc: SparkContext, c: Clients, task: ClientRound, theta: np.ndarray,
                     sampled: list[int], threshold_fraction: float, ring_bits: int, clip: float,
                     weighted: bool, phases: Phases = Phases()) -> SecureResult:
    r = task.round
    t = secagg.threshold(len(sampled), threshold_fraction)
    keys = dict(_job(sc, c, partial(phases.advertise, round_=r), sampled))
    _enough(keys, t, r, "advertised keys")
    sealed = dict(_job(sc, c, partial(phases.share_keys, round_=r, public_keys=keys, t=t), list(keys)))
    _enough(sealed, t, r, "shared their keys")
    shared = {v: keys[v] for v in sealed}
    weights = c.sizes[sorted(shared)] if weighted else np.ones(len(shared))
    # |sum of weight * update| <= sum(weight) * clip per coordinate, plus the weight and bit columns
    scale = secagg.scale_for(float(weights.sum()) * max(clip, 1.0) + len(shared), ring_bits)
    masking = secure_clients.Masking(shared, scale, ring_bits, weighted)
    bc = sc.broadcast(theta)
    try:
        results = _job(sc, c, partial(phases.masked_update, task=task, weights=bc, masking=masking),
                       list(shared))
    finally:
        bc.destroy()
    masked = [d for d in results if "masked" in d]
    survivors = frozenset(d["client"] for d in masked)
    gone = frozenset(shared) - survivors
    _enough(survivors, t, r, "sent their masked updates")
    inbox = sc.broadcast({v: {u: sealed[u][v] for u in shared} for v in survivors})
    try:
        answers = dict(_job(sc, c, partial(phases.unmask_shares, round_=r, public_keys=shared,
                                           inbox=inbox, survivors=survivors, dropped_=gone),
                            list(survivors)))
    finally:
        inbox.destroy()
    total = np.zeros(len(masked[0]["masked"]), dtype=np.uint64)
    for d in masked:
        total += d["masked"]
    x = secagg.decode(secagg.unmask(total, shared, set(survivors), set(gone), answers, t, r, ring_bits),
                      scale, ring_bits)
    bytes_up = (sum(len(k[0]) + len(k[1]) for k in keys.values())
                + sum(len(ct) for s in sealed.values() for ct in s.values())
                + sum(d["masked"].nbytes for d in masked)
                + sum(64 * len(a) for a in answers.values()))
    reports = [{k: v for k, v in d.items() if k != "masked"} for d in masked]
    return SecureResult(x[:-2], float(x[-2]), float(x[-1]), reports,
                        [d for d in results if "dropped" in d], t, scale, bytes_up,
                        {"keys": keys, "sealed": sealed, "masked": masked, "answers": answers})


def _enough(clients: object, t: int, round_: int, step: str) -> None:
    if len(clients) < t:
        raise SecAggError(f"secure aggregation round {round_}: only {len(clients)} clients "
                          f"{step}, below the threshold t={t} (privacy.secagg_threshold of the "
                          "sampled clients); the round cannot finish without unmasking someone")
