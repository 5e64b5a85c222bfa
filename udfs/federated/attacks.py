"""Attack simulation for testing robust aggregation: a seeded share of the clients is malicious and
tampers with what it sends. Only the clients chosen by `malicious_clients` ever run these.

* sign_flip   sends -scale times its honest update
* scale       sends scale times its honest update
* label_flip  trains honestly on flipped labels (class k becomes K-1-k)
* noise       sends Gaussian noise with standard deviation `scale` per coordinate instead
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udfs.core.seeding import Stream, rng

KINDS = ("none", "sign_flip", "scale", "label_flip", "noise")


@dataclass(frozen=True)
class Attack:
    kind: str
    scale: float
    malicious: frozenset[int]

    def labels(self, client: int, y: np.ndarray, n_classes: int) -> np.ndarray:
        if self.kind == "label_flip" and client in self.malicious:
            return (n_classes - 1 - y).astype(y.dtype)
        return y

    def tamper(self, client: int, update: np.ndarray, seed: int, round_: int) -> np.ndarray:
        if client not in self.malicious:
            return update
        if self.kind == "sign_flip":
            return (-self.scale * update).astype(update.dtype)
        if self.kind == "scale":
            return (self.scale * update).astype(update.dtype)
        if self.kind == "noise":
            return rng(seed, Stream.ATTACK, round_, client).normal(
                0.0, self.scale, update.shape).astype(update.dtype)
        return update


def malicious_clients(seed: int, n_clients: int, fraction: float) -> frozenset[int]:
    """round(fraction * n) clients, drawn once per run from the seed."""
    count = int(round(fraction * n_clients))
    return frozenset(int(i) for i in rng(seed, Stream.ATTACK).permutation(n_clients)[:count])
