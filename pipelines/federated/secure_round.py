"""Secure aggregation over clients' partitions: four Spark jobs (advertise keys, share keys, mask,
unmask), with the driver relaying public keys and sealed shares and learning only sums
(pipelines/federated/secure_sum.py, udfs/federated/secure_clients.py). `run_secure_sum` is the
protocol for any vector the clients compute (a federated round's training and masking, the
federated statistics' sums, pipelines/data/stats.py); `run_secure_round` is a training round.

The fixed-point scale is chosen from what the driver already knows, the sampled clients' row counts
and the clip, so that the weighted sum of all of them cannot overflow the ring.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from pyspark import SparkContext

from pipelines.core import py4j
from pipelines.data.blocks import BlockSet
from pipelines.federated import secure_sum
from pipelines.federated.clients import Clients
from udfs.data.blocks import BlockMissing
from udfs.federated import secure_clients
from udfs.federated.clients import ClientRound, Dropped
from udfs.federated.secagg import SecAggError
from udfs.federated.secure_clients import MaskedReport


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
    within_clip: float              # sum over survivors of (within the clip) - 1/2
    loss_sum: float                 # sum of weight * training loss
    seconds_sum: float              # of local training
    survivors: list[int]            # the clients whose masked updates are in the sums
    dropped: list[Dropped]
    scale: float                    # the fixed-point scale the clients encoded with
    bytes_up: int
    received: dict = field(default_factory=dict)   # everything the driver received, by step


def _job(sc: SparkContext, c: BlockSet, step: Callable, partitions: list[int]) -> list:
    return sc.runJob(c.handles, step, sorted(partitions)) if partitions else []


def run_secure_round(sc: SparkContext, c: Clients, task: ClientRound, theta: np.ndarray,
                     sampled: list[int], threshold_fraction: float, ring_bits: int, weighted: bool,
                     phases: Phases = Phases()) -> SecureResult:
    """One protocol run over the sampled clients, each training and masking its update.

    A block found missing before the unmask step (nothing about any sum has been revealed yet)
    is rebuilt and the protocol run again under a fresh id: the same sum, so the same model. In the
    unmask step a rebuild would hand its client a new secret mid-protocol, so the round stops
    instead, with a message that --resume continues the run."""
    bc = sc.broadcast(theta)
    try:
        s = c.run(lambda _: run_secure_sum(
            sc, c, sampled, partial(phases.masked_update, task=task, weights=bc),
            lambda shared: _sum_bound(c, task, shared, weighted), threshold_fraction, ring_bits,
            task.round, phases, weighted))
    finally:
        bc.destroy()
    x = s.total
    weight_sum, within, loss_sum, seconds_sum = secure_clients.decoded_scalars(
        x, secure_clients.coordinate_bound(task.release))
    return SecureResult(x[:-secure_clients.SCALARS], weight_sum, within, loss_sum, seconds_sum,
                        s.survivors, [d for d in s.results if isinstance(d, Dropped)], s.scale,
                        s.bytes_up, s.received)


@dataclass
class SecureSum:
    """What one protocol run gives the driver: the float64 sum of the survivors' vectors and how
    it got there."""

    total: np.ndarray
    survivors: list[int]
    results: list            # every answer of the masking step (masked reports, drop records)
    scale: float
    bytes_up: int
    received: dict           # everything the driver received, by step


def run_secure_sum(sc: SparkContext, c: BlockSet, sampled: list[int], masked_step: Callable,
               bound: Callable[[list[int]], float], threshold_fraction: float, ring_bits: int,
               label: int | str, phases: Phases = Phases(), weighted: bool = False) -> SecureSum:
    """One protocol run over the partitions `sampled` of `c`: `masked_step(rows, masking=...)`
    is each client's masking task (it yields a MaskedReport, or a Dropped record), `bound(shared)`
    bounds |the sum| in any coordinate over the clients that shared keys (it fixes the fixed
    point). The run's id, a fresh random tag and `label`, enters every key derivation, so no two
    runs share keys or masks even when a label repeats."""
    protocol = f"{secrets.token_hex(8)}/{label}"
    t = secure_sum.threshold(len(sampled), threshold_fraction)
    keys = dict(_job(sc, c, partial(phases.advertise, protocol=protocol), sampled))
    _enough(keys, t, label, "advertised keys")
    sealed = dict(_job(sc, c, partial(phases.share_keys, protocol=protocol, public_keys=keys, t=t),
                       list(keys)))
    _enough(sealed, t, label, "shared their keys")
    shared = {v: keys[v] for v in sealed}
    scale = secure_sum.scale_for(bound(sorted(shared)), ring_bits)
    masking = secure_clients.Masking(protocol, shared, scale, ring_bits, weighted)
    results = _job(sc, c, partial(masked_step, masking=masking), list(shared))
    masked = [d for d in results if isinstance(d, MaskedReport)]
    survivors = frozenset(d.client for d in masked)
    gone = frozenset(shared) - survivors
    _enough(survivors, t, label, "sent their masked updates")
    routed = secure_sum.route({u: sealed[u] for u in shared})
    inbox = sc.broadcast({v: routed[v] for v in survivors})
    try:
        answers = _unmask(sc, c, partial(phases.unmask_shares, protocol=protocol, public_keys=shared,
                                         inbox=inbox, survivors=survivors, dropped_=gone),
                          list(survivors), label)
    finally:
        inbox.destroy()
    total = np.zeros(len(masked[0].masked), dtype=np.uint64)
    for d in masked:
        total += d.masked
    x = secure_sum.decode(secure_sum.unmask(total, shared, set(survivors), set(gone), answers, t,
                                            protocol, ring_bits), scale, ring_bits)
    bytes_up = (sum(len(k[0]) + len(k[1]) for k in keys.values())
                + sum(len(ct) for s in sealed.values() for ct in s.values())
                + sum(d.masked.nbytes for d in masked)
                + sum(64 * len(a) for a in answers.values()))
    return SecureSum(x, sorted(survivors), results, scale, bytes_up,
                     {"keys": keys, "sealed": sealed, "masked": masked, "answers": answers})


def _unmask(sc: SparkContext, c: BlockSet, step: Callable, survivors: list[int], round_: int | str) -> dict:
    try:
        return dict(_job(sc, c, step, survivors))
    except Exception as exc:  # noqa: BLE001 - py4j wraps the task's BlockMissing
        if not py4j.raised(exc, BlockMissing.__name__):
            raise
    # raised outside the handler, so BlockSet.run sees no BlockMissing and does not run it again
    raise SecAggError(f"secure aggregation round {round_}: a surviving client's block went missing "
                      "while it unmasked; rebuilding it now would give that client a new secret in "
                      "the middle of the protocol. The run stopped after its last checkpoint: "
                      "--resume continues it")


def _sum_bound(c: Clients, task: ClientRound, shared: list[int], weighted: bool) -> float:
    """A bound on |sum of the encoded vectors| in any coordinate: every coordinate of a client's
    encoding is within weight * coordinate_bound (secure_clients.encoded_input), and the centred
    within-clip bits add at most 1/2 each."""
    weights = c.sizes[shared] if weighted else np.ones(len(shared))
    return float(weights.sum()) * secure_clients.coordinate_bound(task.release) + len(shared)


def _enough(clients: Sized, t: int, round_: int | str, step: str) -> None:
    if len(clients) < t:
        raise SecAggError(f"secure aggregation round {round_}: only {len(clients)} clients "
                          f"{step}, below the threshold t={t} (privacy.secagg_threshold of the "
                          "sampled clients); the round cannot finish without unmasking someone")
