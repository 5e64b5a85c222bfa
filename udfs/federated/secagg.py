"""Secure aggregation, client side (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), for an honest-but-curious server, with the client-side checks
of SecAgg+ (Bell et al. 2020) against one that deviates.

A client adds two kinds of masks to its fixed-point update: pairwise masks PRG(s_uv), which cancel
in the sum over clients, and a self-mask PRG(b_u). The server only ever learns the sum: for a client
that sent its masked vector it reconstructs b_u from Shamir shares held by the others; for a client
that dropped it reconstructs the mask private key s_u instead, to remove the pairwise masks the
survivors added for it. Within one unmask request a client never hands out both kinds of share of
the same peer; across requests, it answers only one request per protocol run (an identical retry is
answered again), which udfs/federated/secure_clients.py enforces with a marker beside its block.

Keys are per protocol run: a client's RoundKeys (its channel key c, mask key s and self-mask seed
b) are fresh from OS entropy when it first advertises, kept beside its block for the run's later
steps and their retries, and deleted when its next run begins, so a leaked long-term secret reveals
no round's masks (forward secrecy). A round, with `public_keys` = {client: (c_pk, s_pk)}:

1. `advertise` -> (c_pk, s_pk); the server broadcasts the keys of every client that advertised.
2. `share_keys` -> {recipient: ciphertext}; the server routes them (`pipelines.secagg.route`).
   From here on `public_keys` must hold only the clients that sent shares: a client whose s_u
   nobody holds shares of cannot be unmasked if it drops.
3. `mask` -> y_u; the server sums the y_u it receives (the survivors).
4. `unmask_shares` -> per client the server asks about, a b share (survivor) or an s share
   (dropped); the server finishes with `pipelines.secagg.unmask`. A client refuses a request that
   lists fewer than t survivors (the threshold travels sealed inside every share), and any step
   refuses a key list in which a public key repeats.

Own shares: `share_keys` also encrypts a client's share of its own secrets to itself and returns it
with the others. It travels through the server like any share (sealed, so the server learns
nothing) and comes back in step 4, where the client opens it like any other, so every answering
client holds a share of every client.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from secrets import randbelow

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from udfs.core.seeding import SECRET_BYTES

PRIME = 2**521 - 1
_SHARE_BYTES = (PRIME.bit_length() + 7) // 8
_NONCE_BYTES = 12
_ROUTE = struct.Struct(">QQI")   # sender, recipient, threshold t
_LABEL = "fedspark/secagg/v1"

RoundId = int | str
"""Names one run of the protocol in every key derivation: the driver passes a fresh random session
tag with the round number, so two protocol runs never share keys or masks, even with one secret."""

PublicKeys = Mapping[int, tuple[bytes, bytes]]
"""{client: (c_pk, s_pk)}: raw X25519 public keys of the channel key and the mask key."""


class SecAggError(RuntimeError):
    """The round cannot finish securely (too few clients, a forged or misrouted share, a request that
    would unmask a client): the round's aggregate must be abandoned, never patched up."""


def check_threshold(t: int, n: int) -> None:
    """Shamir threshold sanity: t = 1 would hand every client the others' secrets in the clear,
    t > n could never be met."""
    if not 2 <= t <= n:
        raise ValueError(f"secure aggregation threshold t={t} must be between 2 and the number of "
                         f"clients n={n}")


def ring_mask(ring_bits: int) -> np.uint64:
    """All-ones mask of the ring Z_(2^ring_bits): uint64 arithmetic wraps mod 2^64, and masking after
    it reduces mod 2^ring_bits (which divides 2^64)."""
    if not 2 <= ring_bits <= 64:
        raise ValueError(f"ring_bits must be between 2 and 64, got {ring_bits}")
    return np.uint64((1 << ring_bits) - 1)


def encode(vec: np.ndarray, scale: float, ring_bits: int = 64) -> np.ndarray:
    """Fixed point: round(vec * scale) in two's complement in the ring, so signed updates add up
    correctly mod 2^ring_bits. A value that does not fit is an error, not a silent wrap-around."""
    ring = ring_mask(ring_bits)
    scaled = np.rint(np.asarray(vec, dtype=np.float64) * scale)
    if not np.all(np.abs(scaled) < 2.0 ** (ring_bits - 1)):  # also rejects nan and inf
        raise ValueError(f"update values times scale {scale} do not fit in a {ring_bits}-bit ring")
    return scaled.astype(np.int64).view(np.uint64) & ring


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uint64 words of AES-256-CTR keystream under `seed`, little-endian. The zero nonce is
    safe because every seed belongs to one round and one purpose, so no key ever encrypts twice.
    Masks live mod 2^64 until a caller reduces its result to the ring: reducing mod 2^ring_bits
    commutes with addition because 2^ring_bits divides 2^64."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def pairwise_masks(s_private: bytes, round: RoundId, me: int, s_public_keys: Mapping[int, bytes],
                   length: int) -> np.ndarray:
    """sum_{v>me} PRG(s_uv) - sum_{v<me} PRG(s_uv) mod 2^64 over the clients in `s_public_keys`
    (me skipped). Each pair adds its mask once with each sign, so pairwise masks cancel in the sum.
    The server calls this with a dropped client's rebuilt key and the survivors' keys: the result
    is exactly the negation of what the survivors added for that client."""
    s_sk = X25519PrivateKey.from_private_bytes(s_private)
    total = np.zeros(length, dtype=np.uint64)
    for v, s_pk in s_public_keys.items():
        if v == me:
            continue
        seed = _derive(s_sk.exchange(X25519PublicKey.from_public_bytes(s_pk)), "pair", round)
        if v > me:
            total += prg(seed, length)
        else:
            total -= prg(seed, length)
    return total


def share_x(client: int) -> int:
    """Shamir x-coordinate of a client's share: id + 1, since the secret itself sits at x = 0."""
    if client < 0:
        raise ValueError(f"client ids must be non-negative, got {client}")
    return client + 1


def shamir_split(secret: bytes, clients: Iterable[int], t: int) -> dict[int, int]:
    """t-of-n Shamir shares {client: y} of a 32-byte secret over GF(2^521 - 1). The coefficients
    come from OS entropy: a seeded generator would let anyone with the seed recompute them."""
    coefficients = [int.from_bytes(secret, "big")] + [randbelow(PRIME) for _ in range(t - 1)]
    return {v: _evaluate(coefficients, share_x(v)) for v in clients}


def _evaluate(coefficients: list[int], x: int) -> int:
    """The polynomial sum_i coefficients[i] x^i mod PRIME, by Horner's rule."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def _derive(material: bytes, purpose: str, round: RoundId) -> bytes:
    """32 bytes of HKDF-SHA256 over `material`. The info string names the purpose and the round, so
    no two keys or seeds ever coincide and a past round's keys are worthless in this one."""
    info = f"{_LABEL}/{purpose}/round={round}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(material)


@dataclass(frozen=True)
class RoundKeys:
    """One client's private keys for one protocol run: the channel key c, the mask key s and the
    self-mask seed b, 32 bytes each, from OS entropy (never derived from a long-lived secret)."""

    c_private: bytes
    s_private: bytes
    b_seed: bytes

    @classmethod
    def fresh(cls) -> RoundKeys:
        return cls(*(os.urandom(SECRET_BYTES) for _ in range(3)))

    def to_bytes(self) -> bytes:
        return self.c_private + self.s_private + self.b_seed

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundKeys:
        if len(data) != 3 * SECRET_BYTES:
            raise ValueError(f"round keys are {3 * SECRET_BYTES} bytes, got {len(data)}")
        return cls(*(data[i:i + SECRET_BYTES] for i in range(0, len(data), SECRET_BYTES)))


def public_key_of(private: bytes) -> bytes:
    """Raw X25519 public key of raw private key bytes (the driver checks a rebuilt key with it)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def advertise(keys: RoundKeys) -> tuple[bytes, bytes]:
    """(c_pk, s_pk) of this run: the channel key for encrypting shares, the mask key for pairwise
    masks. The private keys stay beside the client's block."""
    return public_key_of(keys.c_private), public_key_of(keys.s_private)


def _check_keys(keys: RoundKeys, round: RoundId, me: int, public_keys: PublicKeys) -> None:
    """`me` is in the server's key list with the keys it advertised, and no public key repeats
    (a server that hands one client's key to another could open what is sealed for it)."""
    if me not in public_keys:
        raise ValueError(f"client {me} is not among the clients whose keys the server broadcast")
    if advertise(keys) != tuple(public_keys[me]):
        raise ValueError(f"client {me}'s keys do not match the keys it advertised for round {round}")
    flat = [k for pair in public_keys.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise SecAggError(f"round {round}: the server's key list repeats a public key; client {me} "
                          "refuses it")


def _channel(c_private: bytes, peer_c_pk: bytes, round: RoundId) -> AESGCM:
    """AES-256-GCM under HKDF(X25519(c_me, c_peer)): only the two clients can open what it seals."""
    shared = X25519PrivateKey.from_private_bytes(c_private).exchange(
        X25519PublicKey.from_public_bytes(peer_c_pk))
    return AESGCM(_derive(shared, "channel", round))


def _associated_data(round: RoundId, sender: int, recipient: int) -> bytes:
    """Binds a ciphertext to its round and route, so the server can neither replay nor redirect it."""
    return f"{_LABEL}/shares/round={round}/from={sender}/to={recipient}".encode()


def share_keys(keys: RoundKeys, round: RoundId, me: int, public_keys: PublicKeys,
               t: int) -> dict[int, bytes]:
    """{v: nonce || AES-GCM(me, v, t, s share, b share)} for every v in `public_keys`, me included
    (see the module docstring on own shares), with t-of-n Shamir shares of s_me and b_me."""
    check_threshold(t, len(public_keys))
    _check_keys(keys, round, me, public_keys)
    s_shares = shamir_split(keys.s_private, public_keys, t)
    b_shares = shamir_split(keys.b_seed, public_keys, t)
    sealed = {}
    for v, (c_pk, _) in public_keys.items():
        payload = (_ROUTE.pack(me, v, t) + s_shares[v].to_bytes(_SHARE_BYTES, "big")
                   + b_shares[v].to_bytes(_SHARE_BYTES, "big"))
        nonce = os.urandom(_NONCE_BYTES)
        sealed[v] = nonce + _channel(keys.c_private, c_pk, round).encrypt(
            nonce, payload, _associated_data(round, me, v))
    return sealed


def _open(c_private: bytes, round: RoundId, sender: int, me: int, ciphertext: bytes,
          public_keys: PublicKeys) -> tuple[int, int, int]:
    """(s share, b share, t) that `sender` sealed for `me`; SecAggError if it was tampered with or
    sent along another route."""
    nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    try:
        payload = _channel(c_private, public_keys[sender][0], round).decrypt(
            nonce, body, _associated_data(round, sender, me))
    except InvalidTag as exc:
        raise SecAggError(f"round {round}: the shares client {sender} sent to client {me} fail "
                          f"authentication (tampered with or misrouted)") from exc
    route_from, route_to, t = _ROUTE.unpack_from(payload)
    if (route_from, route_to) != (sender, me):
        raise SecAggError(f"round {round}: the shares client {sender} sent to client {me} name "
                          f"another route {(route_from, route_to)}")
    s_share, b_share = payload[_ROUTE.size:_ROUTE.size + _SHARE_BYTES], payload[-_SHARE_BYTES:]
    return int.from_bytes(s_share, "big"), int.from_bytes(b_share, "big"), t


def mask(keys: RoundKeys, round: RoundId, me: int, public_keys: PublicKeys, x: np.ndarray,
         ring_bits: int = 64) -> np.ndarray:
    """y = x + PRG(b_me) + sum_{v>me} PRG(s_me,v) - sum_{v<me} PRG(s_me,v) mod 2^ring_bits, pairing
    with every other client in `public_keys` (which must be the clients that sent shares)."""
    ring = ring_mask(ring_bits)
    if x.dtype != np.uint64 or np.any(x & ~ring):
        raise ValueError(f"mask expects encoded uint64 values of a {ring_bits}-bit ring, "
                         f"got {x.dtype}")
    _check_keys(keys, round, me, public_keys)
    s_public = {v: s_pk for v, (_, s_pk) in public_keys.items()}
    y = x + prg(keys.b_seed, x.size) + pairwise_masks(keys.s_private, round, me, s_public, x.size)
    return y & ring


def unmask_shares(keys: RoundKeys, round: RoundId, me: int, ciphertexts_for_me: Mapping[int, bytes],
                  public_keys: PublicKeys, survivors: set[int],
                  dropped: set[int]) -> dict[int, tuple[str, int]]:
    """{v: ("b", my share of b_v)} for survivors, {v: ("s", my share of s_v)} for dropped clients.
    Refuses a request naming a client in both sets (with both secrets of one client the server
    could strip its masks and read its update) and one listing fewer than t survivors, t as every
    sender sealed it into its shares."""
    both = survivors & dropped
    if both:
        raise SecAggError(f"round {round}: the server asked client {me} for both the self-mask and "
                          f"the mask-key shares of clients {sorted(both)}; answering would unmask "
                          f"them")
    _check_keys(keys, round, me, public_keys)
    opened = {}
    for v in survivors | dropped:
        if v not in ciphertexts_for_me:
            raise SecAggError(f"round {round}: client {me} holds no shares from client {v}")
        opened[v] = _open(keys.c_private, round, v, me, ciphertexts_for_me[v], public_keys)
    thresholds = {t for _, _, t in opened.values()}
    if len(thresholds) != 1 or len(survivors) < min(thresholds):
        raise SecAggError(f"round {round}: the server lists {len(survivors)} survivors to client {me}, "
                          f"below the threshold t={sorted(thresholds)} its shares were made for")
    return {v: ("b", b) if v in survivors else ("s", s_share) for v, (s_share, b, _) in opened.items()}
