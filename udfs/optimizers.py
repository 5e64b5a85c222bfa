"""SGD, momentum and Adam over a flat parameter vector, with explicit state.

The state is a dict of arrays shaped like theta plus the step count `t`, so it can live on the driver
(sync), travel with a partition or client (local, federated), be averaged across partitions and be
checkpointed as plain arrays. `step` updates theta and the state in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Smallest magnitude kept in Adam's moment buffers. Moments of always-zero inputs (black pixels)
# decay geometrically into subnormal floats, which make numpy 1.2-1.4x slower; flushing them to zero
# changes nothing measurable in the update (they are below 1e-30).
_FLUSH_BELOW = 1e-30


@dataclass(frozen=True)
class Optimizer:
    name: str
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "momentum", "adam"):
            raise ValueError(f"optimizer must be sgd, momentum or adam, got {self.name!r}")

    def init_state(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh state for `theta`: no buffers for SGD, velocity for momentum, two moments for Adam."""
        names = {"sgd": (), "momentum": ("velocity",), "adam": ("m", "v")}[self.name]
        return {name: np.zeros_like(theta) for name in names}

    def step(self, theta: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], t: int) -> None:
        """Apply update number `t` (1-based) to theta and the state in place."""
        if self.name == "sgd":
            theta -= self.lr * grad
        elif self.name == "momentum":
            vel = state["velocity"]
            vel *= self.momentum
            vel -= self.lr * grad
            theta += vel
        else:
            self._adam(theta, grad, state["m"], state["v"], t)

    def _adam(self, theta: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, t: int) -> None:
        """Adam as Keras applies it: the bias correction folded into the step size, eps unscaled."""
        m *= self.beta1
        m += (1.0 - self.beta1) * grad
        v *= self.beta2
        v += (1.0 - self.beta2) * (grad * grad)
        if theta.dtype == np.float32:
            m[np.abs(m) < _FLUSH_BELOW] = 0.0
            v[v < _FLUSH_BELOW] = 0.0
        alpha = self.lr * np.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        theta -= (alpha * m) / (np.sqrt(v) + self.eps)
