"""The four client steps of a secure-aggregation round (udfs/federated/secagg.py), each a task over one
client's partition. Every step reads the client's own secret from its block directory and
re-derives its keys from it; nothing private leaves the task. A step that fails for a client drops
that client from the round (the protocol is built to survive dropouts) instead of failing the job.

What a client encodes: [weight * update, weight, within_clip - 1/2, weight * loss, seconds] (see
encoded_input), where weight is the client's sample count (FedAvg's weighting) or 1 (DP-FedAvg,
which needs every client's influence bounded by the clip), and the centred bit says whether the
update was within the clip (adaptive clipping's, Andrew et al. 2021: one client moves the count by
at most 1/2). The driver only ever learns the sums of these parts over the survivors: no client's
update, row count, loss or training time.

`protocol` names the protocol run in every key derivation (udfs.secagg.RoundId): the driver makes
it from a fresh random tag and the round number.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from udfs.core import files
from udfs.data import blocks
from udfs.federated import secagg
from udfs.federated.clients import ClientReport, ClientRound, Dropped, client_of, dropped, local_update
from udfs.federated.noise import Release

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


def _run_file(path: str, protocol: secagg.RoundId, kind: str) -> str:
    """The client's file of one protocol run: `keys` (its RoundKeys) or `unmask` (the request it
    answered)."""
    tag = hashlib.sha256(str(protocol).encode()).hexdigest()[:16]
    return blocks.private_file(path, f"{RUN_FILE_PREFIX}{tag}.{kind}")


RUN_FILE_PREFIX = "secagg-"


def round_keys(path: str, protocol: secagg.RoundId, start: bool = False) -> secagg.RoundKeys:
    """This client's keys for `protocol`. `start` (advertising): fresh ones, or on a retry those the
    first attempt made, after deleting every earlier run's files (forward secrecy); the later steps
    only read them back."""
    file = _run_file(path, protocol, "keys")
    if start:
        keep = os.path.basename(file).rpartition(".")[0]
        for name in os.listdir(path):
            if name.startswith(RUN_FILE_PREFIX) and not name.startswith(keep):
                os.remove(os.path.join(path, name))
        return secagg.RoundKeys.from_bytes(files.create_once(file, secagg.RoundKeys.fresh().to_bytes()))
    try:
        with open(file, "rb") as fh:
            return secagg.RoundKeys.from_bytes(fh.read())
    except FileNotFoundError:
        raise secagg.SecAggError(f"this client holds no keys for protocol run {protocol}: it did not "
                                 "advertise in it") from None


def advertise(rows: Iterable[Any], protocol: secagg.RoundId) -> Iterator[tuple[int, tuple[bytes, bytes]]]:
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        yield client, secagg.advertise(round_keys(path, protocol, start=True))
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
        yield client, secagg.share_keys(round_keys(path, protocol), protocol, client, public_keys, t)
    except blocks.BlockMissing:
        raise
    except Exception:  # noqa: BLE001
        return


@dataclass(frozen=True)
class MaskedReport:
    """A client task's answer under secure aggregation: its id and the masked encoding, nothing in
    clear (its row count, loss and training time are masked coordinates too)."""

    client: int
    masked: np.ndarray


# what the driver learns after the update's coordinates: sums of [weight, within_clip - 1/2,
# weight * loss, seconds], the last two scaled by unit / cap into the update's fixed-point range
SCALARS = 4
LOSS_CAP, SECONDS_CAP = 1e3, 1e5   # a loss or a time above its cap counts as the cap


def coordinate_bound(release: Release) -> float:
    """A bound on |a released update's coordinate| (the clip, plus 8 standard deviations of local DP
    noise, exceeded with probability about 1e-15 per coordinate), at least 1."""
    if release.clip is None:
        raise ValueError("secure aggregation needs clipped updates (a bound for the fixed point)")
    return max(release.clip + 8.0 * release.noise_std, 1.0)


def encoded_input(report: ClientReport, weighted: bool, unit: float) -> np.ndarray:
    """[weight * update, weight, within_clip - 1/2, weight * loss * unit / LOSS_CAP,
    seconds * unit / SECONDS_CAP] in float64, the vector a client masks; `unit` is
    coordinate_bound, so every coordinate stays within weight * unit."""
    weight = float(report.n) if weighted else 1.0
    within = float(bool(report.within_clip)) - 0.5
    loss = weight * min(report.train_loss, LOSS_CAP) * unit / LOSS_CAP
    seconds = min(report.seconds, SECONDS_CAP) * unit / SECONDS_CAP
    return np.concatenate([report.update.astype(np.float64) * weight, [weight, within, loss, seconds]])


def decoded_scalars(x: np.ndarray, unit: float) -> tuple[float, float, float, float]:
    """(sum of weights, sum of within_clip - 1/2, sum of weight * loss, sum of seconds) from the
    last SCALARS coordinates of an unmasked sum."""
    weight, within, loss, seconds = (float(v) for v in x[-SCALARS:])
    return weight, within, loss * LOSS_CAP / unit, seconds * SECONDS_CAP / unit


def masked_update(rows: Iterable[Any], task: ClientRound, weights: Broadcast[np.ndarray],
                  masking: Masking) -> Iterator[MaskedReport | Dropped]:
    """Train, then send only the masked encoding of the update and its scalars."""
    handle = client_of(rows)
    if handle is None:
        return
    client, path = handle
    try:
        report = local_update(path, client, task, weights.value)
        x = secagg.encode(encoded_input(report, masking.weighted, coordinate_bound(task.release)),
                          masking.scale, masking.ring_bits)
        y = secagg.mask(round_keys(path, masking.protocol), masking.protocol, client,
                        masking.public_keys, x, masking.ring_bits)
    except blocks.BlockMissing:
        raise
    except Exception as exc:  # noqa: BLE001 - a client's failure must not fail the round
        yield dropped(client, exc)
        return
    yield MaskedReport(client, y)


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
        yield client, answer_unmask(path, client, protocol, public_keys, inbox.value[client],
                                    survivors, dropped_)
    except blocks.BlockMissing:
        raise
    except Exception:  # noqa: BLE001 - a silent survivor is one fewer answer, not a failed round
        return


def answer_unmask(path: str, client: int, protocol: secagg.RoundId,
                  public_keys: Mapping[int, tuple[bytes, bytes]], ciphertexts: Mapping[int, bytes],
                  survivors: frozenset[int], dropped_: frozenset[int]) -> dict[int, tuple[str, int]]:
    """The client at `path` answers one unmask request per protocol run: the first request it sees
    is recorded beside its keys (created once), an identical retry (a Spark task retry) is answered
    again, and any other request is refused, so a server cannot ask for a peer's self-mask share in
    one request and its mask-key share in another."""
    request = hashlib.sha256(json.dumps(
        [sorted(survivors), sorted(dropped_), sorted((v, c.hex()) for v, c in ciphertexts.items())]
    ).encode()).hexdigest().encode()
    if files.create_once(_run_file(path, protocol, "unmask"), request) != request:
        raise secagg.SecAggError(f"client {client} already answered another unmask request in "
                                 f"protocol run {protocol}; it answers one per run")
    return secagg.unmask_shares(round_keys(path, protocol), protocol, client, ciphertexts, public_keys,
                                set(survivors), set(dropped_))
