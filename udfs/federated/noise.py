"""What a client does to its update before it leaves the task: clip it to an L2 norm (for
differential privacy, and so secure aggregation's fixed-point sum cannot overflow) and, for local
DP, add its own Gaussian noise (McMahan et al. 2018 for the clipping; the noise is the Gaussian
mechanism with std noise_multiplier * clip)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udfs.core.seeding import secret_rng


def clip(update: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """The update scaled down to L2 norm at most `bound`, and its norm before clipping."""
    wide = update.astype(np.float64, copy=False)
    norm = float(np.linalg.norm(wide))
    if norm <= bound:
        return update, norm
    # a hair inside the bound, so rounding to float32 cannot push the norm above it
    return (wide * (bound / norm * (1 - 1e-6))).astype(update.dtype), norm


@dataclass(frozen=True)
class DpMode:
    """Who adds a DP mode's Gaussian noise: each client to its own clipped update (`local`: the
    driver is not trusted with updates), or the server to the sum of the clipped updates (`central`:
    the driver is trusted, whoever sees the model is not); `none` adds none."""

    client_noise: bool
    server_noise: bool

    @property
    def enabled(self) -> bool:
        return self.client_noise or self.server_noise


# privacy.dp
DP_MODES = {"none": DpMode(False, False), "central": DpMode(False, True), "local": DpMode(True, False)}


@dataclass(frozen=True)
class Release:
    """How every client of a round releases its update (the same for all clients of the round)."""

    clip: float | None = None       # L2 bound; None leaves the update as trained
    noise_std: float = 0.0          # local DP: Gaussian noise the client adds itself
    report_clipped: bool = False    # adaptive clipping: send whether the norm was within the bound

    def apply(self, update: np.ndarray, noise: np.random.Generator | None
              ) -> tuple[np.ndarray, bool | None]:
        """(the update as released, whether it was within the clip when adaptive clipping asks).
        `noise`: the client's own generator for local DP (see `client_noise`), None without."""
        within: bool | None = None
        if self.clip is not None:
            update, norm = clip(update, self.clip)
            if self.report_clipped:
                within = bool(norm <= self.clip)
        if self.noise_std > 0:
            if noise is None:
                raise ValueError("local DP needs the client's noise generator")
            update = (update + noise.normal(0.0, self.noise_std, update.shape)).astype(update.dtype)
        return update, within


def client_noise(secret: bytes, run_id: str, round_: int, client: int) -> np.random.Generator:
    """Local DP's noise for one client's update in one round: keyed by the client's own secret,
    which never leaves its executor, and bound to the run, so the driver (which chose the seed)
    cannot rebuild and subtract it, two runs of one config draw different noise even from a block
    kept between them, and a retried task draws the same noise again."""
    return secret_rng(secret, "local-dp", f"run={run_id}", f"round={round_}", f"client={client}")
