"""Secure aggregation, driver side (Bonawitz et al. 2017; the client steps and the round's order are
in `udfs.federated.secagg`). The driver routes sealed shares, sums the masked vectors it receives, and
recovers the sum of the survivors' encoded updates from the shares the survivors return: it learns
that sum and nothing about any single client's update.

Fixed point: updates travel as `encode(vec, scale_for(bound, ring_bits))` in Z_(2^ring_bits), and
the unmasked sum comes back as floats through `decode`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from functools import lru_cache

import numpy as np

from udfs.federated.secagg import (
    PRIME,
    SECRET_BYTES,
    PublicKeys,
    RoundId,
    SecAggError,
    check_threshold,
    pairwise_masks,
    prg,
    public_key_of,
    ring_mask,
    share_x,
)

Answers = Mapping[int, Mapping[int, tuple[str, int]]]
"""{answering client: {client asked about: ("b" or "s", share)}}, from `udfs.secagg.unmask_shares`."""


def threshold(n: int, fraction: float) -> int:
    """Shamir threshold for n clients: max(2, ceil(fraction * n)). The product is taken on the
    decimal the config wrote, since in floats 0.07 * 100 = 7.000000000000001 would round up to 8."""
    if not 0 < fraction <= 1:
        raise ValueError(f"secure aggregation threshold fraction must be in (0, 1], got {fraction}")
    t = max(2, math.ceil(Fraction(str(fraction)) * n))
    check_threshold(t, n)
    return t


def scale_for(bound: float, ring_bits: int = 64) -> float:
    """Largest power of two s with s * bound <= 2^(ring_bits - 2): an encoded sum whose real value
    is at most `bound` in absolute value then stays below 2^(ring_bits - 1), with a factor 2 to
    spare for the clients' rounding. A power of two makes encoding and decoding exact scalings."""
    ring_mask(ring_bits)  # rejects a ring size outside 2..64
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"the bound on the aggregate must be a positive number, got {bound}")
    mantissa, exponent = math.frexp(bound)  # bound = mantissa * 2^exponent, 0.5 <= mantissa < 1
    ceil_log2 = exponent - 1 if mantissa == 0.5 else exponent
    return math.ldexp(1.0, ring_bits - 2 - ceil_log2)


def decode(total: np.ndarray, scale: float, ring_bits: int = 64) -> np.ndarray:
    """Float64 values of ring elements: the top bit of ring_bits is the sign (shift it up to bit
    63, reinterpret as int64, shift back arithmetically), then divide by the scale."""
    if total.dtype != np.uint64:
        raise ValueError(f"decode expects a uint64 ring vector, got {total.dtype}")
    shift = 64 - ring_bits
    signed = ((total & ring_mask(ring_bits)) << np.uint64(shift)).view(np.int64) >> np.int64(shift)
    return signed / scale


def route(ciphertexts_by_sender: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """{recipient: {sender: ciphertext}} from {sender: {recipient: ciphertext}}: the server only
    forwards sealed shares, it cannot open them."""
    inbox: dict[int, dict[int, bytes]] = {}
    for sender, sealed in ciphertexts_by_sender.items():
        for recipient, ciphertext in sealed.items():
            inbox.setdefault(recipient, {})[sender] = ciphertext
    return inbox


@lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients l_i = prod_{j!=i} x_j / (x_j - x_i) mod PRIME, so that f(0) =
    sum_i l_i f(x_i). Cached: every secret of a round is usually rebuilt from the same holders,
    and this is the O(t^2) part."""
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(coefficients)


def reconstruct(shares: Mapping[int, int], t: int) -> bytes:
    """The 32-byte secret behind Shamir shares {holder client: share}, from the t lowest holder
    ids. A result that does not fit in 32 bytes means the shares are inconsistent."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret with threshold {t}")
    holders = sorted(shares)[:t]
    coefficients = _lagrange_at_zero(tuple(share_x(h) for h in holders))
    value = sum(c * shares[h] for c, h in zip(coefficients, holders, strict=False)) % PRIME
    if value >> (8 * SECRET_BYTES):
        raise SecAggError(f"the shares held by clients {holders} are inconsistent")
    return value.to_bytes(SECRET_BYTES, "big")


def _shares_of(client: int, kind: str, answers: Answers) -> dict[int, int]:
    """{holder: share} of `client`'s secret of `kind` ("b" or "s") among the answers."""
    shares = {}
    for holder, answer in answers.items():
        if client in answer:
            got, share = answer[client]
            if got != kind:
                raise SecAggError(f"client {holder} returned a {got!r} share of client {client}, "
                                  f"expected {kind!r}")
            shares[holder] = share
    return shares


def _check_sets(public_keys: PublicKeys, survivors: set[int], dropped: set[int],
                answers: Answers) -> None:
    """Survivors and dropped must split the clients that shared keys, and only survivors answer:
    any other split leaves masks in the sum that nothing removes."""
    if survivors & dropped or survivors | dropped != set(public_keys):
        raise ValueError(f"survivors {sorted(survivors)} and dropped {sorted(dropped)} must split "
                         f"the clients that shared keys {sorted(public_keys)}")
    if not set(answers) <= survivors:
        raise ValueError(f"clients {sorted(set(answers) - survivors)} answered the unmasking "
                         f"request but sent no masked vector")


def unmask(sum_y: np.ndarray, public_keys: PublicKeys, survivors: set[int], dropped: set[int],
           shares_from_survivors: Answers, t: int, round: RoundId, ring_bits: int = 64) -> np.ndarray:
    """Sum of the survivors' encoded updates (mod 2^ring_bits) from the sum of their masked vectors
    (a plain uint64 sum: it wraps mod 2^64, which 2^ring_bits divides). Removes each survivor's
    self-mask PRG(b_u), and each dropped client's pairwise masks with the survivors, from secrets
    rebuilt out of at least t answering survivors' shares."""
    _check_sets(public_keys, survivors, dropped, shares_from_survivors)
    if len(shares_from_survivors) < t:
        raise SecAggError(f"secure aggregation round {round}: {len(survivors)} of "
                          f"{len(public_keys)} clients survived and {len(shares_from_survivors)} "
                          f"answered the unmasking request, below the threshold t={t}")
    if sum_y.dtype != np.uint64:
        raise ValueError(f"unmask expects the uint64 sum of masked vectors, got {sum_y.dtype}")
    total = sum_y.copy()
    for u in sorted(survivors):
        total -= prg(reconstruct(_shares_of(u, "b", shares_from_survivors), t), total.size)
    s_public = {u: public_keys[u][1] for u in survivors}
    for v in sorted(dropped):
        s_private = reconstruct(_shares_of(v, "s", shares_from_survivors), t)
        if public_key_of(s_private) != public_keys[v][1]:
            raise SecAggError(f"round {round}: the reconstructed mask key of dropped client {v} "
                              f"does not match the key it advertised")
        total += pairwise_masks(s_private, round, v, s_public, total.size)
    return total & ring_mask(ring_bits)
