"""SGD, momentum and Adam over a flat parameter vector, with explicit state.

The state is a dict of arrays shaped like theta plus the step count `t`, so it can live on the driver
(sync), travel with a partition or client (local, federated), be averaged across partitions and be
checkpointed as plain arrays. `step` updates theta and the state in place. Each rule is a function
registered by name in OPTIMIZERS, which the config's trainer.optimizer.name is built from.
"""
from __future__ import annotations

from collections.abc import Callable
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


def sgd(opt: Optimizer, theta: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray],
        t: int) -> None:
    theta -= opt.lr * grad


def momentum(opt: Optimizer, theta: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray],
             t: int) -> None:
    vel = state["velocity"]
    vel *= opt.momentum
    vel -= opt.lr * grad
    theta += vel


def adam(opt: Optimizer, theta: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray],
         t: int) -> None:
    """Adam as Keras applies it: the bias correction folded into the step size, eps unscaled.
    Written with in-place operations on one scratch vector: at 10^5 parameters the update costs
    more than a small batch's gradient, and temporaries double it."""
    m, v = state["m"], state["v"]
    tmp = _scratch(theta)
    m *= opt.beta1
    np.multiply(grad, 1.0 - opt.beta1, out=tmp)
    m += tmp
    v *= opt.beta2
    np.multiply(grad, grad, out=tmp)
    tmp *= 1.0 - opt.beta2
    v += tmp
    if theta.dtype == np.float32 and t % FLUSH_EVERY == 0:
        m[np.abs(m) < FLUSH_BELOW] = 0.0
        v[v < FLUSH_BELOW] = 0.0
    alpha = opt.lr * np.sqrt(1.0 - opt.beta2 ** t) / (1.0 - opt.beta1 ** t)
    np.sqrt(v, out=tmp)
    tmp += opt.eps
    np.divide(m, tmp, out=tmp)
    tmp *= alpha
    theta -= tmp


@dataclass(frozen=True)
class Rule:
    """An optimizer's state buffers (each shaped like theta) and its in-place step."""

    buffers: tuple[str, ...]
    step: Callable[[Optimizer, np.ndarray, np.ndarray, dict[str, np.ndarray], int], None]


# trainer.optimizer.name: the config accepts exactly these names, in this order
OPTIMIZERS: dict[str, Rule] = {
    "adam": Rule(("m", "v"), adam),
    "sgd": Rule((), sgd),
    "momentum": Rule(("velocity",), momentum),
}


@dataclass(frozen=True)
class Optimizer:
    """Hyperparameters of the named rule in OPTIMIZERS. The defaults are the tests' shorthand; jobs
    pass every value from the config (conf/default.yaml)."""

    name: str
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.name!r}")

    def init_state(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh state for `theta`: no buffers for SGD, velocity for momentum, two moments for Adam."""
        return {name: np.zeros_like(theta) for name in OPTIMIZERS[self.name].buffers}

    def step(self, theta: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], t: int) -> None:
        """Apply update number `t` (1-based) to theta and the state in place."""
        OPTIMIZERS[self.name].step(self, theta, grad, state, t)
