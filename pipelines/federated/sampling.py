"""How a round picks its clients (federated.sampling): each sampler draws the round's client indices
from the round's generator and says how many it picks on average, which fixes the denominator of
central DP's noisy mean and the Byzantine budget of the robust rules."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampler:
    """`draw(gen, n_clients, fraction, min_clients)` -> sorted client indices;
    `expected(n_clients, fraction, min_clients)` -> clients per round on average; `varies`: the
    count changes from round to round (a round may sample too few to run, and is skipped)."""

    draw: Callable[[np.random.Generator, int, float, int], list[int]]
    expected: Callable[[int, float, int], float]
    varies: bool


def _fixed_count(n_clients: int, fraction: float, min_clients: int) -> float:
    return min(n_clients, max(min_clients, int(round(fraction * n_clients))))


def _fixed(gen: np.random.Generator, n_clients: int, fraction: float, min_clients: int) -> list[int]:
    """A fixed fraction of the clients, at least min_clients, without replacement."""
    m = int(_fixed_count(n_clients, fraction, min_clients))
    return sorted(int(i) for i in gen.choice(n_clients, size=m, replace=False))


def _poisson(gen: np.random.Generator, n_clients: int, fraction: float, min_clients: int) -> list[int]:
    """Each client independently with probability `fraction`: what privacy accountants assume."""
    return [int(i) for i in np.flatnonzero(gen.random(n_clients) < fraction)]


SAMPLERS = {
    "fixed": Sampler(_fixed, _fixed_count, varies=False),
    "poisson": Sampler(_poisson, lambda n, fraction, _min: fraction * n, varies=True),
}
