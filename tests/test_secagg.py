"""Secure aggregation: whole rounds with in-process clients (no Spark), the fixed-point encoding,
Shamir sharing and the checks that keep the server from unmasking a single client."""
from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce

import numpy as np
import pytest

from pipelines.federated import secure_sum as server
from udfs.federated import secagg as client
from udfs.federated.secagg import SecAggError

ROUND = 7
IDS = [0, 3, 4, 11, 25, 26, 40, 57, 58, 99]  # sampled client ids: gaps, and id 0 (x = 1)
T = server.threshold(len(IDS), 0.6)


@dataclass
class Round:
    total: np.ndarray  # what the server unmasked
    expected: np.ndarray  # the ring sum of the survivors' encoded updates
    masked: dict[int, np.ndarray]
    encoded: dict[int, np.ndarray]


def updates_for(ids: list[int], d: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0.0, 1.0, d) for u in ids}


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The element-wise uint64 sum of ring vectors (it wraps mod 2^64), as the server adds them."""
    return np.asarray(np.sum(vectors, axis=0, dtype=np.uint64))


def float_sum(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """The plain float sum of the updates, added in order: what the decoded total must match."""
    return reduce(operator.add, vectors)


def scale_of(updates: dict[int, np.ndarray], ring_bits: int = 64) -> float:
    return server.scale_for(sum(float(np.abs(x).max()) for x in updates.values()), ring_bits)


def run_round(updates: dict[int, np.ndarray], scale: float, t: int = T, drop_before_mask=(),
              drop_before_unmask=(), ring_bits: int = 64) -> Round:
    """advertise -> share_keys -> route -> mask -> sum -> unmask_shares -> unmask, fresh keys.
    Clients in drop_before_mask send no masked vector; those in drop_before_unmask send one but do
    not answer the unmasking request."""
    ids = sorted(updates)
    keys = {u: client.RoundKeys.fresh() for u in ids}
    public_keys = {u: client.advertise(keys[u]) for u in ids}
    inbox = server.route({u: client.share_keys(keys[u], ROUND, u, public_keys, t) for u in ids})
    encoded = {u: client.encode(updates[u], scale, ring_bits) for u in ids}
    masked = {u: client.mask(keys[u], ROUND, u, public_keys, encoded[u], ring_bits)
              for u in ids if u not in drop_before_mask}
    survivors, dropped = set(masked), set(ids) - set(masked)
    sum_y = ring_sum(list(masked.values()))
    answers = {u: client.unmask_shares(keys[u], ROUND, u, inbox[u], public_keys, survivors, dropped)
               for u in sorted(survivors - set(drop_before_unmask))}
    total = server.unmask(sum_y, public_keys, survivors, dropped, answers, t, ROUND, ring_bits)
    expected = ring_sum([encoded[u] for u in survivors]) & client.ring_mask(ring_bits)
    return Round(total, expected, masked, encoded)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_full_round_gives_the_exact_sum():
    updates = updates_for(IDS, 1000)
    scale = scale_of(updates)
    r = run_round(updates, scale)
    assert r.total.dtype == np.uint64
    assert np.array_equal(r.total, r.expected)
    assert rel_l2(server.decode(r.total, scale), float_sum(updates.values())) < 1e-9


@pytest.mark.parametrize("drop_before_mask, drop_before_unmask", [
    ((25,), ()),
    ((0, 40, 99), ()),
    ((), (3,)),
    ((0, 40, 99), (3,)),  # 7 survivors, 6 answer: exactly t
])
def test_dropouts_still_give_the_exact_sum_of_the_survivors(drop_before_mask, drop_before_unmask):
    updates = updates_for(IDS, 1000)
    scale = scale_of(updates)
    r = run_round(updates, scale, drop_before_mask=drop_before_mask,
                  drop_before_unmask=drop_before_unmask)
    assert np.array_equal(r.total, r.expected)
    survivors = [u for u in IDS if u not in drop_before_mask]
    assert rel_l2(server.decode(r.total, scale), float_sum(updates[u] for u in survivors)) < 1e-9


def test_fewer_than_t_answers_raise():
    assert T == 6
    updates = updates_for(IDS, 50)
    with pytest.raises(SecAggError, match=r"threshold t=6") as info:
        run_round(updates, scale_of(updates), drop_before_mask=(0, 3, 4), drop_before_unmask=(11, 25))
    assert f"{len(IDS) - 3} of {len(IDS)} clients survived" in str(info.value)   # 7 survivors, 5 answer


def test_a_client_refuses_a_request_listing_fewer_than_t_survivors():
    updates = updates_for(IDS, 50)
    with pytest.raises(SecAggError, match=r"lists 5 survivors to client \d+, below the threshold t=\[6\]"):
        run_round(updates, scale_of(updates), drop_before_mask=(0, 3, 4, 11, 25))


def test_a_client_refuses_a_key_list_that_repeats_a_public_key():
    keys, public_keys, inbox = _shared_round([1, 2, 3], 2)
    forged = {**public_keys, 3: public_keys[2]}   # the server hands 2's keys out as 3's too
    with pytest.raises(SecAggError, match="repeats a public key"):
        client.share_keys(keys[1], ROUND, 1, forged, 2)
    with pytest.raises(SecAggError, match="repeats a public key"):
        client.unmask_shares(keys[1], ROUND, 1, inbox[1], forged, {1, 2, 3}, set())


def test_masked_vector_looks_uniform_and_uncorrelated_with_the_input():
    updates = updates_for([2, 5, 9], 100_000, seed=1)
    r = run_round(updates, scale_of(updates), t=2)
    y, x = r.masked[5], r.encoded[5]
    counts = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = y.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 degrees of freedom: mean 255, sd 22.6
    pearson = np.corrcoef(y.view(np.int64).astype(float), x.view(np.int64).astype(float))[0, 1]
    assert abs(pearson) < 0.02


def test_fresh_secrets_give_different_masks_but_the_same_sum():
    updates = updates_for(IDS[:4], 500)
    scale = scale_of(updates)
    first, second = run_round(updates, scale, t=3), run_round(updates, scale, t=3)
    for u in updates:
        assert not np.array_equal(first.masked[u], second.masked[u])
    assert np.array_equal(first.total, second.total)
    assert np.array_equal(first.total, first.expected)


def _shared_round(ids: list[int], t: int):
    keys = {u: client.RoundKeys.fresh() for u in ids}
    public_keys = {u: client.advertise(keys[u]) for u in ids}
    inbox = server.route({u: client.share_keys(keys[u], ROUND, u, public_keys, t) for u in ids})
    return keys, public_keys, inbox


def test_a_client_refuses_both_shares_of_one_client():
    keys, public_keys, inbox = _shared_round([1, 2, 3], 2)
    with pytest.raises(SecAggError, match=r"both .*\[2\]"):
        client.unmask_shares(keys[1], ROUND, 1, inbox[1], public_keys, {1, 2}, {2, 3})
    answers = client.unmask_shares(keys[1], ROUND, 1, inbox[1], public_keys, {1, 2}, {3})
    assert {v: kind for v, (kind, _) in answers.items()} == {1: "b", 2: "b", 3: "s"}


def test_tampered_or_misrouted_shares_are_rejected():
    keys, public_keys, inbox = _shared_round([1, 2, 3], 2)
    tampered = {**inbox[1], 2: inbox[1][2][:-1] + bytes([inbox[1][2][-1] ^ 1])}
    with pytest.raises(SecAggError, match="client 2 sent to client 1"):
        client.unmask_shares(keys[1], ROUND, 1, tampered, public_keys, {1, 2, 3}, set())
    redirected = {**inbox[1], 2: inbox[3][2]}  # what 2 sealed for 3, handed to 1
    reflected = {**inbox[1], 2: inbox[2][1]}  # what 1 sealed for 2 (same channel key), back to 1
    for forged in (redirected, reflected):
        with pytest.raises(SecAggError, match="client 2 sent to client 1"):
            client.unmask_shares(keys[1], ROUND, 1, forged, public_keys, {1, 2, 3}, set())


def test_a_forged_share_of_a_dropped_key_is_caught():
    ids = [1, 2, 3, 4]
    keys, public_keys, inbox = _shared_round(ids, 2)
    survivors, dropped = {1, 2, 3}, {4}
    answers = {u: client.unmask_shares(keys[u], ROUND, u, inbox[u], public_keys, survivors, dropped)
               for u in survivors}
    kind, share = answers[1][4]
    answers[1][4] = (kind, share + 1)
    with pytest.raises(SecAggError, match="inconsistent|does not match"):
        server.unmask(np.zeros(3, np.uint64), public_keys, survivors, dropped, answers, 2, ROUND)


def test_ring_bits_32_round_trip():
    updates = updates_for(IDS, 1000)
    scale = scale_of(updates, ring_bits=32)
    r = run_round(updates, scale, ring_bits=32)
    assert all(int(y.max()) < 2**32 for y in r.masked.values())
    assert np.array_equal(r.total, r.expected)
    assert rel_l2(server.decode(r.total, scale, ring_bits=32), float_sum(updates.values())) < 1e-6


def test_shamir_any_t_shares_reconstruct_and_coefficients_are_fresh():
    secret = os.urandom(32)
    shares = client.shamir_split(secret, IDS, 4)
    for holders in (IDS[:4], IDS[-4:], IDS[::3]):
        assert server.reconstruct({h: shares[h] for h in holders}, 4) == secret
    with pytest.raises(SecAggError, match="threshold 4"):
        server.reconstruct({h: shares[h] for h in IDS[:3]}, 4)
    assert client.shamir_split(secret, IDS, 4) != shares


@pytest.mark.parametrize("ring_bits", [64, 32])
@pytest.mark.parametrize("bound", [10.0, 8.0, 0.3, 1234.5])
def test_scale_for_is_the_largest_safe_power_of_two(bound, ring_bits):
    scale = server.scale_for(bound, ring_bits)
    assert math.log2(scale).is_integer()
    assert scale * bound <= 2.0 ** (ring_bits - 2) < 2 * scale * bound


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_a_sum_at_the_bound_does_not_overflow(ring_bits):
    n, bound = 10, 4.0  # a power of two: scale * bound is exactly 2^(ring_bits - 2)
    scale = server.scale_for(bound, ring_bits)
    parts = [client.encode(np.array([bound / n, -bound / n, 0.0]), scale, ring_bits)
             for _ in range(n)]
    total = ring_sum(parts) & client.ring_mask(ring_bits)
    np.testing.assert_allclose(server.decode(total, scale, ring_bits), [bound, -bound, 0.0],
                               rtol=1e-6)


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_negative_values_round_trip(ring_bits):
    x = np.array([-1.5, -1e-3, -123.25, 0.0, 2.5, -2.0**-20])
    scale = server.scale_for(200.0, ring_bits)
    decoded = server.decode(client.encode(x, scale, ring_bits), scale, ring_bits)
    np.testing.assert_allclose(decoded, x, rtol=0, atol=0.5 / scale)


def test_encode_rejects_values_that_would_wrap():
    with pytest.raises(ValueError, match="32-bit ring"):
        client.encode(np.array([2.0**31]), 1.0, ring_bits=32)
    with pytest.raises(ValueError, match="64-bit ring"):
        client.encode(np.array([np.nan]), 1.0)


def test_threshold():
    assert server.threshold(100, 0.07) == 7  # not 8: 0.07 * 100 is 7.000000000000001 in floats
    assert server.threshold(10, 0.05) == 2
    assert server.threshold(3, 1.0) == 3
    with pytest.raises(ValueError, match=r"t=2.*n=1"):
        server.threshold(1, 0.5)


def test_a_server_that_asks_twice_recovers_nothing(tmp_path):
    """A deviating server asks every client twice in one protocol run: first with the victim among
    the survivors (for its self-mask shares), then among the dropped (for its mask-key shares). Each
    client answers only the first request (an identical retry again), so the server never holds both
    of the victim's secrets and cannot strip its masks."""
    from udfs.federated import secure_clients

    ids, victim, t, protocol = [1, 2, 3, 4], 3, 2, "c0ffee/1"
    paths = {u: tmp_path / f"part-{u}" for u in ids}
    for path in paths.values():
        path.mkdir()
    keys = {u: secure_clients.round_keys(str(paths[u]), protocol, start=True) for u in ids}
    public_keys = {u: client.advertise(keys[u]) for u in ids}
    inbox = server.route({u: client.share_keys(keys[u], protocol, u, public_keys, t) for u in ids})
    everyone = frozenset(ids)

    def ask(u: int, survivors: frozenset[int], dropped: frozenset[int]) -> dict | None:
        try:
            return secure_clients.answer_unmask(str(paths[u]), u, protocol, public_keys, inbox[u],
                                                survivors, dropped)
        except SecAggError:
            return None

    first = {u: ask(u, everyone, frozenset()) for u in ids}
    assert all(first.values()) and ask(1, everyone, frozenset()) == first[1]   # a retry: the same
    second = {u: ask(u, everyone - {victim}, frozenset({victim})) for u in ids if u != victim}
    assert second == {u: None for u in ids if u != victim}
    s_shares = {u: answer[victim][1] for u, answer in second.items() if answer and answer[victim][0] == "s"}
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        server.reconstruct(s_shares, t)


def test_round_keys_are_fresh_per_protocol_run_and_the_last_run_s_are_deleted(tmp_path):
    """Forward secrecy: a client's keys come from OS entropy, not from its block's secret, and
    starting a new protocol run deletes the previous run's keys and answers."""
    from udfs.federated import secure_clients

    block = tmp_path / "part-0"
    block.mkdir()
    first = secure_clients.round_keys(str(block), "a/1", start=True)
    assert secure_clients.round_keys(str(block), "a/1", start=True) == first   # a retried advertise
    assert secure_clients.round_keys(str(block), "a/1") == first
    second = secure_clients.round_keys(str(block), "b/2", start=True)
    assert second != first and len(list(block.iterdir())) == 1
    with pytest.raises(SecAggError, match="holds no keys for protocol run a/1"):
        secure_clients.round_keys(str(block), "a/1")
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in block.iterdir())
