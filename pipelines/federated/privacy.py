"""Differential privacy on the driver: DP-FedAvg's noisy average (McMahan et al. 2018), adaptive
clipping (Andrew et al. 2021) and the privacy accountant.

Central DP: every sampled client clips its update to L2 norm C (udfs/federated/noise.py); the driver adds
Gaussian noise with std z*C to their sum and divides by the expected number of clients q*N (a fixed
denominator, so one client's presence changes the average by at most C/(qN)). With adaptive
clipping each client also sends b - 1/2, where b says whether its norm was within C (centred, so
one client moves the sum by at most 1/2); the driver estimates the fraction within the clip as
(sum + N(0, sigma_b^2)) / (qN) + 1/2 and moves C geometrically towards the target quantile,
C <- C * exp(-eta * (fraction - quantile)). The two releases together are one Gaussian mechanism
with noise multiplier z when the update noise uses z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
sigma_b = qN/20 as in the paper, but at least z: below that z_delta would blow up (2 sigma_b must
exceed z), and at sigma_b = z the update noise is only 15% above z.

Local DP: each client adds its own noise with std z*C before the update leaves its task. The driver
sees every participant's noisy update, so sampling does not amplify privacy, and a client's clipped
update can move by 2C when its data change: epsilon is that of R rounds of the Gaussian mechanism
with noise multiplier z/2, no subsampling (a client that takes part in every round).

Central DP wraps the round's aggregation (as Flower's DP strategies wrap another strategy): CentralDP
takes the plain sum of the clients' clipped updates, from their reports or from secure aggregation,
and returns the noisy average, moving the clip as it goes.

Accounting: Google's dp-accounting (Renyi DP); central DP is R rounds of the Poisson-subsampled
Gaussian mechanism with sampling rate q = federated.fraction and noise multiplier z. A round that
samples too few clients to run is still counted.

Where the randomness comes from (NoiseKey): the run seed is published (config.yaml, spec.json, the
summary, the records), so noise drawn from it could be rebuilt and subtracted by anyone who reads
the run. Central DP's noise and its Poisson client sample are drawn from a per-run secret from OS
entropy instead (pipelines/store/artifacts.noise_secret: mode 0600 beside the checkpoints, read back
on resume). privacy.reproducible_noise: true draws them from the seed, for experiments only: the
guarantee then holds only against someone who knows neither the seed nor the run's files.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting import rdp

from pipelines.core.config import Config, ConfigError
from udfs.core.seeding import SECRET_BYTES, Stream, rng, secret_rng
from udfs.federated.noise import DP_MODES, DpMode, Release

CLIP_LEARNING_RATE = 0.2       # eta of Andrew et al. 2021
# dp-accounting logs a warning for each low fractional RDP order it cannot evaluate and skips it
absl_logging.set_verbosity(absl_logging.ERROR)


@functools.lru_cache(maxsize=4096)
def epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """epsilon after `rounds` rounds of the Poisson-subsampled Gaussian (q, z) at `delta`."""
    if rounds == 0:
        return 0.0
    if z <= 0:
        return math.inf
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class NoiseKey:
    """The source of central DP's noise and DP sampling: the run's secret, or (None, with
    privacy.reproducible_noise) the run seed."""

    secret: bytes | None
    seed: int

    def rng(self, purpose: str, round_: int, stream: Stream, *keys: int) -> np.random.Generator:
        if self.secret is None:
            return rng(self.seed, stream, round_, *keys)
        return secret_rng(self.secret, purpose, f"round={round_}", *keys)


def needs_secret(config: Config) -> bool:
    """Whether the run's noise and sampling come from a per-run secret (central DP, by default)."""
    return DP_MODES[config.privacy.dp].server_noise and not config.privacy.reproducible_noise


def fresh_secret(config: Config) -> bytes | None:
    """The secret of a training that is never resumed (an estimator's fit, a benchmark)."""
    return os.urandom(SECRET_BYTES) if needs_secret(config) else None


@dataclass(frozen=True)
class Dp:
    """The run's DP settings, and the round-by-round mechanism they define."""

    mode: str                  # a key of DP_MODES
    z: float
    clip: float | None       # required (by the config) when a DP mode is enabled
    adaptive: bool
    quantile: float
    delta: float
    target_epsilon: float | None
    q: float
    expected_clients: float    # q * N: the fixed denominator of the noisy average

    @classmethod
    def from_config(cls, config: Config, n_clients: int) -> Dp:
        p, fed = config.privacy, config.federated
        return cls(p.dp, p.noise_multiplier, p.clip, p.adaptive_clip, p.target_quantile, p.delta,
                   p.target_epsilon, fed.fraction, fed.fraction * n_clients)

    @property
    def kind(self) -> DpMode:
        return DP_MODES[self.mode]

    @property
    def enabled(self) -> bool:
        return self.kind.enabled

    @property
    def central(self) -> bool:
        """The driver adds the noise to the sum, so it wraps the aggregation (CentralDP)."""
        return self.kind.server_noise

    @property
    def count_noise(self) -> float:
        """sigma_b, the std of the noise on the centred count of clients within the clip."""
        return max(self.expected_clients / 20.0, self.z)

    @property
    def update_noise_multiplier(self) -> float:
        if not self.adaptive or self.z == 0:
            return self.z
        return (self.z ** -2 - (2 * self.count_noise) ** -2) ** -0.5

    def init_state(self) -> dict[str, np.ndarray]:
        if not self.enabled:
            return {}
        if self.clip is None:
            raise ConfigError(f"privacy.dp={self.mode} needs privacy.clip")
        return {"clip": np.array([self.clip])}

    def release(self, state: dict[str, np.ndarray], clip_for_overflow: float | None) -> Release:
        """How clients release their updates this round."""
        if not self.enabled:   # secure aggregation's bound: clients say whether they were within it
            return Release(clip=clip_for_overflow, report_clipped=clip_for_overflow is not None)
        c = float(state["clip"][0])
        noise = self.z * c if self.kind.client_noise else 0.0
        return Release(clip=c, noise_std=noise, report_clipped=self.adaptive)

    def epsilon_after(self, rounds: int) -> float | None:
        if not self.enabled:
            return None
        if self.kind.client_noise:
            return epsilon(1.0, self.z / 2, rounds, self.delta)
        return epsilon(self.q, self.z, rounds, self.delta)

    def may_run(self, round_: int) -> bool:
        """False once running this round would take epsilon past the target."""
        spent = self.epsilon_after(round_)
        return spent is None or self.target_epsilon is None or spent <= self.target_epsilon

    def check_startable(self) -> None:
        if self.enabled and self.target_epsilon is not None and not self.may_run(1):
            raise ConfigError(
                f"privacy.target_epsilon={self.target_epsilon} cannot be met: one round with "
                f"federated.fraction={self.q} and privacy.noise_multiplier={self.z} already spends "
                f"epsilon={self.epsilon_after(1):.3g} at delta={self.delta}; raise the noise "
                "multiplier or lower the fraction")

    def noisy_mean(self, total: np.ndarray, state: dict[str, np.ndarray], key: NoiseKey,
                   round_: int) -> np.ndarray:
        """Central DP: (sum of clipped updates + N(0, (z_delta C)^2)) / (q N)."""
        c = float(state["clip"][0])
        noise = key.rng("central-dp/update", round_, Stream.DP_NOISE).normal(
            0.0, self.update_noise_multiplier * c, total.shape)
        return (total + noise) / self.expected_clients

    def adapt_clip(self, centred_within: float, state: dict[str, np.ndarray], key: NoiseKey,
                   round_: int) -> None:
        """Adaptive clipping: move C towards the target quantile of the clients' update norms, from
        the sum over clients of (within the clip) - 1/2."""
        if not (self.enabled and self.adaptive):
            return
        noise = key.rng("central-dp/count", round_, Stream.DP_NOISE, 1).normal(0.0, self.count_noise)
        fraction = (centred_within + noise) / self.expected_clients + 0.5
        state["clip"] = state["clip"] * math.exp(-CLIP_LEARNING_RATE * (fraction - self.quantile))

    def summary(self, rounds: int, state: dict[str, np.ndarray], secure_clip: float | None) -> dict:
        """The summary's `privacy` part; `clip` is the last round's bound (secure aggregation alone
        clips to `secure_clip`, privacy.clip or privacy.secagg_bound)."""
        secure_aggregation = secure_clip is not None
        clip = float(state["clip"][0]) if self.enabled else secure_clip
        return {"secure_aggregation": secure_aggregation, "dp": self.mode,
                "epsilon": self.epsilon_after(rounds), "delta": self.delta if self.enabled else None,
                "noise_multiplier": self.z if self.enabled else None, "clip": clip}


# What the driver received from a round's clients, its server state and the round -> the aggregate
Aggregate = Callable[[Any, dict[str, np.ndarray], int], np.ndarray]


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg around a plain aggregation: `summed` gives the (unweighted) sum of the clients'
    clipped updates; the wrapper releases its noisy average, then adapts the clip from the clients'
    centred within-clip bits (`received.within_clip`), in that order: the noise uses this round's
    clip. It wraps the sum, not the weighted mean, because its denominator is fixed (q N)."""

    dp: Dp
    key: NoiseKey
    summed: Aggregate

    def __call__(self, received: Any, state: dict[str, np.ndarray], round_: int) -> np.ndarray:
        aggregate = self.dp.noisy_mean(self.summed(received, state, round_), state, self.key, round_)
        self.dp.adapt_clip(received.within_clip, state, self.key, round_)
        return aggregate
