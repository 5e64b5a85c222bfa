"""A federated round under secure aggregation: four Spark jobs over the sampled clients' partitions
(advertise keys, share keys, train and mask, unmask), with the driver relaying public keys and
sealed shares and learning only sums (pipelines/federated/secure_sum.py, udfs/federated/secure_clients.py).

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


def _job(sc: SparkContext, c: Clients, step: Callable, partitions: list[int]) -> list:
    return sc.runJob(c.handles, step, sorted(partitions)) if partitions else []


def run_secure_round(sc: SparkContext, c: Clients, task: ClientRound, theta: np.ndarray,
                     sampled: list[int], threshold_fraction: float, ring_bits: int, weighted: bool,
                     phases: Phases = Phases()) -> SecureResult:
    """One protocol run over the sampled clients. Its id, a fresh random tag and the round, enters
    every key derivation, so no two runs share keys or masks even when a round number repeats.

    A block found missing before the unmask step (nothing about any sum has been revealed yet)
    is rebuilt and the protocol run again under a fresh id: the same sum, so the same model. In the
    unmask step a rebuild would hand its client a new secret mid-protocol, so the round stops
    instead, with a message that --resume continues the run."""
    return c.run(lambda _: _protocol(sc, c, task, theta, sampled, threshold_fraction, ring_bits,
                                     weighted, phases))


def _protocol(sc: SparkContext, c: Clients, task: ClientRound, theta: np.ndarray,
              sampled: list[int], threshold_fraction: float, ring_bits: int, weighted: bool,
              phases: Phases) -> SecureResult:
    r = task.round
    protocol = f"{secrets.token_hex(8)}/{r}"
    t = secure_sum.threshold(len(sampled), threshold_fraction)
    keys = dict(_job(sc, c, partial(phases.advertise, protocol=protocol), sampled))
    _enough(keys, t, r, "advertised keys")
    sealed = dict(_job(sc, c, partial(phases.share_keys, protocol=protocol, public_keys=keys, t=t),
                       list(keys)))
    _enough(sealed, t, r, "shared their keys")
    shared = {v: keys[v] for v in sealed}
    scale = secure_sum.scale_for(_sum_bound(c, task, shared, weighted), ring_bits)
    masking = secure_clients.Masking(protocol, shared, scale, ring_bits, weighted)
    bc = sc.broadcast(theta)
    try:
        results = _job(sc, c, partial(phases.masked_update, task=task, weights=bc, masking=masking),
                       list(shared))
    finally:
        bc.destroy()
    masked = [d for d in results if isinstance(d, MaskedReport)]
    survivors = frozenset(d.client for d in masked)
    gone = frozenset(shared) - survivors
    _enough(survivors, t, r, "sent their masked updates")
    routed = secure_sum.route({u: sealed[u] for u in shared})
    inbox = sc.broadcast({v: routed[v] for v in survivors})
    try:
        answers = _unmask(sc, c, partial(phases.unmask_shares, protocol=protocol, public_keys=shared,
                                         inbox=inbox, survivors=survivors, dropped_=gone),
                          list(survivors), r)
    finally:
        inbox.destroy()
    total = np.zeros(len(masked[0].masked), dtype=np.uint64)
    for d in masked:
        total += d.masked
    x = secure_sum.decode(secure_sum.unmask(total, shared, set(survivors), set(gone), answers, t, protocol,
                                    ring_bits), scale, ring_bits)
    bytes_up = (sum(len(k[0]) + len(k[1]) for k in keys.values())
                + sum(len(ct) for s in sealed.values() for ct in s.values())
                + sum(d.masked.nbytes for d in masked)
                + sum(64 * len(a) for a in answers.values()))
    weight_sum, within, loss_sum, seconds_sum = secure_clients.decoded_scalars(
        x, secure_clients.coordinate_bound(task.release))
    return SecureResult(x[:-secure_clients.SCALARS], weight_sum, within, loss_sum, seconds_sum,
                        sorted(survivors), [d for d in results if isinstance(d, Dropped)], scale, bytes_up,
                        {"keys": keys, "sealed": sealed, "masked": masked, "answers": answers})


def _unmask(sc: SparkContext, c: Clients, step: Callable, survivors: list[int], round_: int) -> dict:
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


def _sum_bound(c: Clients, task: ClientRound, shared: dict, weighted: bool) -> float:
    """A bound on |sum of the encoded vectors| in any coordinate: every coordinate of a client's
    encoding is within weight * coordinate_bound (secure_clients.encoded_input), and the centred
    within-clip bits add at most 1/2 each."""
    weights = c.sizes[sorted(shared)] if weighted else np.ones(len(shared))
    return float(weights.sum()) * secure_clients.coordinate_bound(task.release) + len(shared)


def _enough(clients: Sized, t: int, round_: int, step: str) -> None:
    if len(clients) < t:
        raise SecAggError(f"secure aggregation round {round_}: only {len(clients)} clients "
                          f"{step}, below the threshold t={t} (privacy.secagg_threshold of the "
                          "sampled clients); the round cannot finish without unmasking someone")
