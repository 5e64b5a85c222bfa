"""Server-side federated strategies: small pure step functions over the round's mean update.

A client's update is (its locally trained weights - the round's global weights). Every strategy
first takes the sample-weighted mean of the updates (the FedAvg "pseudo-gradient", negated); its
server rule is a step `(theta, mean_update, state, rule) -> (theta, state)` that returns new arrays,
registered with its state initialiser in STRATEGIES (as Flower's strategies are objects):

* fedavg / fedprox / fedsgd: theta += server_lr * mean     (they differ on the client: rounds.py)
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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

ADAPTIVE_BETA1 = 0.9
ADAPTIVE_BETA2 = 0.99

State = dict[str, np.ndarray]


def weighted_mean(updates: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Sample-weighted mean of the clients' updates, accumulated in float64."""
    total = float(sum(counts))
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for update, n in zip(updates, counts, strict=False):
        acc += (n / total) * update
    return acc


def _moved(theta: np.ndarray, step: np.ndarray) -> np.ndarray:
    return (theta + step).astype(theta.dtype)


def no_state(theta: np.ndarray, rule: ServerRule) -> State:
    return {}


def fedavg(theta: np.ndarray, mean: np.ndarray, state: State, rule: ServerRule) -> tuple[np.ndarray, State]:
    return _moved(theta, rule.server_lr * mean), {}


def velocity_state(theta: np.ndarray, rule: ServerRule) -> State:
    return {"velocity": np.zeros(theta.shape, np.float64)}


def fedavgm(theta: np.ndarray, mean: np.ndarray, state: State, rule: ServerRule) -> tuple[np.ndarray, State]:
    velocity = rule.server_momentum * state["velocity"] + mean
    return _moved(theta, rule.server_lr * velocity), {"velocity": velocity}


def moments_state(theta: np.ndarray, rule: ServerRule) -> State:
    return {"m": np.zeros(theta.shape, np.float64), "v": np.full(theta.shape, rule.tau ** 2, np.float64)}


def adagrad_v(v: np.ndarray, sq: np.ndarray) -> np.ndarray:
    return v + sq


def adam_v(v: np.ndarray, sq: np.ndarray) -> np.ndarray:
    return ADAPTIVE_BETA2 * v + (1 - ADAPTIVE_BETA2) * sq


def yogi_v(v: np.ndarray, sq: np.ndarray) -> np.ndarray:
    return v - (1 - ADAPTIVE_BETA2) * sq * np.sign(v - sq)


def adaptive(theta: np.ndarray, mean: np.ndarray, state: State, rule: ServerRule,
             second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, State]:
    """FedAdagrad / FedAdam / FedYogi: Adam-like moments of the mean update; only v's rule differs."""
    m = ADAPTIVE_BETA1 * state["m"] + (1 - ADAPTIVE_BETA1) * mean
    v = second_moment(state["v"], mean * mean)
    return _moved(theta, rule.server_lr * m / (np.sqrt(v) + rule.tau)), {"m": m, "v": v}


Step = Callable[[np.ndarray, np.ndarray, State, "ServerRule"], tuple[np.ndarray, State]]


@dataclass(frozen=True)
class Strategy:
    init: Callable[[np.ndarray, ServerRule], State]
    step: Step


# federated.strategy: the config accepts exactly these names, in this order
STRATEGIES: dict[str, Strategy] = {
    "fedavg": Strategy(no_state, fedavg),
    "fedprox": Strategy(no_state, fedavg),
    "fedavgm": Strategy(velocity_state, fedavgm),
    "fedadagrad": Strategy(moments_state, partial(adaptive, second_moment=adagrad_v)),
    "fedadam": Strategy(moments_state, partial(adaptive, second_moment=adam_v)),
    "fedyogi": Strategy(moments_state, partial(adaptive, second_moment=yogi_v)),
    "fedsgd": Strategy(no_state, fedavg),
}


@dataclass(frozen=True)
class ServerRule:
    """The named strategy with its settings (federated.server_lr, server_momentum, tau). The
    defaults are the tests' shorthand; jobs pass every value from the config."""

    name: str
    server_lr: float = 1.0
    server_momentum: float = 0.9
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"federated.strategy must be one of {tuple(STRATEGIES)}, got {self.name!r}")

    def init_state(self, theta: np.ndarray) -> State:
        return STRATEGIES[self.name].init(theta, self)

    def apply(self, theta: np.ndarray, mean_update: np.ndarray, state: State) -> np.ndarray:
        """The next global weights (same dtype as theta). The round's state dict (which also holds
        DP's clip) takes the step's new arrays, so the caller's FedState carries them on."""
        theta, new = STRATEGIES[self.name].step(theta, mean_update, state, self)
        state.update(new)
        return theta
