"""The four client steps of a secure-aggregation round (udfs/federated/secagg.py), each a task over one
client's partition. Every step reads the client's own secret from its block directory and
re-derives its keys from it; nothing private leaves the task. A step that fails for a client drops
that client from the round (the protocol is built to survive dropouts) instead of failing the job.

What a client encodes: [weight * update, weight, within_clip - 1/2], where weight is the client's
sample count (FedAvg's weighting) or 1 (DP-FedAvg, which needs every client's influence bounded by
the clip), and the centred bit is adaptive clipping's (Andrew et al. 2021: one client moves the
count by at most 1/2). The driver only ever learns the sums of these parts over the survivors.

`protocol` names the protocol run in every key derivation (udfs.secagg.RoundId): the driver makes
it from a fresh random tag and the round number.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.data import blocks
from udfs.federated import secagg
from udfs.federated.clients import ClientReport, ClientRound, Dropped, RoundReport, client_of, dropped, local_update

if TYPE_CHECKING:
    from pyspark import Broadcast


@dataclass(frozen=True)
class Masking:
    """What the driver broadcast for the masking step."""

    protocol: secagg.RoundId
    public_keys: Mapping[int, tuple[bytes, bytes]]   # the clients that shared their keys
    scale: float
    ring_bits: int
    weighted: bool


def advertise(rows: Iterable[Any], protocol: secagg.RoundId) -> Iterator[tuple[int, tuple[bytes, bytes]]]:
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        yield client, secagg.advertise(blocks.secret(path), protocol)
    except blocks.BlockMissing:
        raise   # the executor lost the block, not the client: the driver rebuilds (secure_round)
    except Exception:  # noqa: BLE001 - a client that cannot take part is simply left out
        return


def share_keys(rows: Iterable[Any], protocol: secagg.RoundId,
               public_keys: Mapping[int, tuple[bytes, bytes]], t: int) -> Iterator[tuple[int, dict[int, bytes]]]:
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        yield client, secagg.share_keys(blocks.secret(path), protocol, client, public_keys, t)
    except blocks.BlockMissing:
        raise
    except Exception:  # noqa: BLE001
        return


@dataclass(frozen=True)
class MaskedReport(RoundReport):
    """A client task's answer under secure aggregation: the masked encoding instead of the update."""

    masked: np.ndarray


def encoded_input(report: ClientReport, weighted: bool) -> np.ndarray:
    """[weight * update, weight, within_clip - 1/2] in float64, the vector a client masks."""
    weight = float(report.n) if weighted else 1.0
    within = float(bool(report.within_clip)) - 0.5
    return np.concatenate([report.update.astype(np.float64) * weight, [weight, within]])


def masked_update(rows: Iterable[Any], task: ClientRound, weights: Broadcast[np.ndarray],
                  masking: Masking) -> Iterator[MaskedReport | Dropped]:
    """Train, then send only the masked encoding of the update, with the count and loss."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        report = local_update(path, client, task, weights.value)
        x = secagg.encode(encoded_input(report, masking.weighted), masking.scale, masking.ring_bits)
        y = secagg.mask(blocks.secret(path), masking.protocol, client, masking.public_keys, x,
                        masking.ring_bits)
    except blocks.BlockMissing:
        raise
    except Exception as exc:  # noqa: BLE001 - a client's failure must not fail the round
        yield dropped(client, exc)
        return
    yield MaskedReport(client, report.n, report.train_loss, report.seconds, y)


def unmask_shares(rows: Iterable[Any], protocol: secagg.RoundId,
                  public_keys: Mapping[int, tuple[bytes, bytes]],
                  inbox: Broadcast[dict[int, Any]], survivors: frozenset[int], dropped_: frozenset[int]
                  ) -> Iterator[tuple[int, dict[int, tuple[str, int]]]]:
    """This survivor's shares: of b for the other survivors, of s for the dropped clients."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        yield client, secagg.unmask_shares(blocks.secret(path), protocol, client, inbox.value[client],
                                           public_keys, set(survivors), set(dropped_))
    except blocks.BlockMissing:
        raise
    except Exception:  # noqa: BLE001 - a silent survivor is one fewer answer, not a failed round
        return
