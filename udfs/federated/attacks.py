"""Attack simulation for testing robust aggregation: a seeded share of the clients is malicious and
tampers with what it sends. Only the clients chosen by `malicious_clients` ever run these.

* sign_flip   sends -scale times its honest update
* scale       sends scale times its honest update
* label_flip  trains honestly on flipped labels (class k becomes K-1-k)
* noise       sends Gaussian noise with standard deviation `scale` per coordinate instead

Each attack is a pair of small functions in ATTACKS (what it does to the labels it trains on and to
the update it sends); robust.attack.kind accepts exactly its names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from udfs.core.seeding import Stream, rng


def honest_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    return y


def flipped_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    return (n_classes - 1 - y).astype(y.dtype)


def honest_update(update: np.ndarray, scale: float, gen: Callable[[], np.random.Generator]) -> np.ndarray:
    return update


def sign_flip(update: np.ndarray, scale: float, gen: Callable[[], np.random.Generator]) -> np.ndarray:
    return (-scale * update).astype(update.dtype)


def scaled(update: np.ndarray, scale: float, gen: Callable[[], np.random.Generator]) -> np.ndarray:
    return (scale * update).astype(update.dtype)


def noise(update: np.ndarray, scale: float, gen: Callable[[], np.random.Generator]) -> np.ndarray:
    return gen().normal(0.0, scale, update.shape).astype(update.dtype)


@dataclass(frozen=True)
class Tampering:
    """What a malicious client changes: the labels it trains on, the update it sends (`gen` draws
    the client's attack stream of the round)."""

    labels: Callable[[np.ndarray, int], np.ndarray] = honest_labels
    update: Callable[[np.ndarray, float, Callable[[], np.random.Generator]], np.ndarray] = honest_update


ATTACKS: dict[str, Tampering] = {
    "none": Tampering(),
    "sign_flip": Tampering(update=sign_flip),
    "scale": Tampering(update=scaled),
    "label_flip": Tampering(labels=flipped_labels),
    "noise": Tampering(update=noise),
}


@dataclass(frozen=True)
class Attack:
    kind: str
    scale: float
    malicious: frozenset[int]

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"robust.attack.kind must be one of {tuple(ATTACKS)}, got {self.kind!r}")

    def labels(self, client: int, y: np.ndarray, n_classes: int) -> np.ndarray:
        if client not in self.malicious:
            return y
        return ATTACKS[self.kind].labels(y, n_classes)

    def tamper(self, client: int, update: np.ndarray, seed: int, round_: int) -> np.ndarray:
        if client not in self.malicious:
            return update
        return ATTACKS[self.kind].update(update, self.scale,
                                         lambda: rng(seed, Stream.ATTACK, round_, client))


def malicious_clients(seed: int, n_clients: int, fraction: float) -> frozenset[int]:
    """round(fraction * n) clients, drawn once per run from the seed."""
    count = int(round(fraction * n_clients))
    return frozenset(int(i) for i in rng(seed, Stream.ATTACK).permutation(n_clients)[:count])
