"""Server-side federated strategies: small functions over the clients' update vectors.

A client's update is (its locally trained weights - the round's global weights). Every strategy
first takes the sample-weighted mean of the updates (the FedAvg "pseudo-gradient", negated), then
applies its server rule to the global weights:

* fedavg / fedprox / fedsgd: theta += server_lr * mean     (FedProx differs on the client: mu)
* fedavgm:  v = server_momentum * v + mean; theta += server_lr * v          (Hsu et al. 2019)
* fedadagrad / fedadam / fedyogi (Reddi et al. 2021, "Adaptive Federated Optimization"):
      m = b1 m + (1 - b1) mean
      v = v + mean^2                                       (adagrad)
      v = b2 v + (1 - b2) mean^2                           (adam)
      v = v - (1 - b2) mean^2 sign(v - mean^2)             (yogi)
      theta += server_lr * m / (sqrt(v) + tau)
  with b1 = 0.9, b2 = 0.99 as in the paper, and v starting at tau^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedsgd")
ADAPTIVE_BETA1 = 0.9
ADAPTIVE_BETA2 = 0.99


def weighted_mean(updates: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Sample-weighted mean of the clients' updates, accumulated in float64."""
    total = float(sum(counts))
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for update, n in zip(updates, counts, strict=False):
        acc += (n / total) * update
    return acc


@dataclass(frozen=True)
class ServerRule:
    name: str
    server_lr: float = 1.0
    server_momentum: float = 0.9
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"federated.strategy must be one of {STRATEGIES}, got {self.name!r}")

    def init_state(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        if self.name == "fedavgm":
            return {"velocity": np.zeros(theta.shape, np.float64)}
        if self.name in ("fedadagrad", "fedadam", "fedyogi"):
            return {"m": np.zeros(theta.shape, np.float64),
                    "v": np.full(theta.shape, self.tau ** 2, np.float64)}
        return {}

    def apply(self, theta: np.ndarray, mean_update: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """The next global weights (same dtype as theta); updates `state` in place."""
        step = self._step(mean_update, state)
        return (theta + step).astype(theta.dtype)

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        if self.name == "fedavgm":
            vel = state["velocity"]
            vel *= self.server_momentum
            vel += delta
            return self.server_lr * vel
        if self.name in ("fedadagrad", "fedadam", "fedyogi"):
            m, v = state["m"], state["v"]
            m *= ADAPTIVE_BETA1
            m += (1 - ADAPTIVE_BETA1) * delta
            sq = delta * delta
            if self.name == "fedadagrad":
                v += sq
            elif self.name == "fedadam":
                v *= ADAPTIVE_BETA2
                v += (1 - ADAPTIVE_BETA2) * sq
            else:
                v -= (1 - ADAPTIVE_BETA2) * sq * np.sign(v - sq)
            return self.server_lr * m / (np.sqrt(v) + self.tau)
        return self.server_lr * delta
