"""SGD, momentum and Adam over a flat parameter vector, with explicit state.

The state is a dict of arrays shaped like theta plus the step count `t`, so it can live on the driver
(sync), travel with a partition or client (local, federated), be averaged across partitions and be
checkpointed as plain arrays. `step` updates theta and the state in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Adam's moment buffers of always-zero inputs (black pixels) decay geometrically into subnormal
# floats, which make numpy 1.2-1.4x slower. Every FLUSH_EVERY steps, magnitudes below FLUSH_BELOW are
# set to zero: a float32 at 1e-30 needs more than 100 steps of decay (0.9^100 = 3e-5) to become
# subnormal (< 1.2e-38), so none does, and such tiny moments change no update measurably.
FLUSH_BELOW = 1e-30
FLUSH_EVERY = 100

# One scratch vector per (size, dtype) in each process, so a step allocates nothing.
_SCRATCH: dict[tuple[int, str], np.ndarray] = {}


def _scratch(like: np.ndarray) -> np.ndarray:
    key = (like.size, like.dtype.str)
    buf = _SCRATCH.get(key)
    if buf is None:
        _SCRATCH.clear()
        buf = _SCRATCH[key] = np.empty_like(like)
    return buf


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
        """Adam as Keras applies it: the bias correction folded into the step size, eps unscaled.
        Written with in-place operations on one scratch vector: at 10^5 parameters the update costs
        more than a small batch's gradient, and temporaries double it."""
        tmp = _scratch(theta)
        m *= self.beta1
        np.multiply(grad, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        np.multiply(grad, grad, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        if theta.dtype == np.float32 and t % FLUSH_EVERY == 0:
            m[np.abs(m) < FLUSH_BELOW] = 0.0
            v[v < FLUSH_BELOW] = 0.0
        alpha = self.lr * np.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        np.sqrt(v, out=tmp)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= alpha
        theta -= tmp
