"""Federated training (driver side): partitions as private clients, rounds of sampled local training,
server-side aggregation.

Clients (pipelines/federated/clients.py) come from a column or a partitioner over the train split.
Client i's rows are Spark partition i: no task ever holds
two clients' rows, and a round runs one task per sampled client (SparkContext.runJob over just those
partitions), so unsampled clients cost nothing. What a client's task returns is only its update,
its sample count and its training loss (udfs/federated/clients.py).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from pyspark import SparkContext

from pipelines.core.config import Config, ConfigError, FederatedSection
from pipelines.data.blocks import Blocks
from pipelines.federated import privacy, robust, secure_round, secure_sum
from pipelines.federated.clients import Clients
from pipelines.federated.sampling import SAMPLERS
from pipelines.federated.server import ServerRule
from pipelines.training.data_parallel import evaluate, optimizer_from
from udfs.core.models import Model
from udfs.core.seeding import Stream
from udfs.federated import clients
from udfs.federated.attacks import Attack, malicious_clients
from udfs.federated.noise import Release


def sample(fed: FederatedSection, round_: int, n_clients: int, seed: int,
           secret: bytes | None = None) -> list[int]:
    """The clients of a round, drawn by the federated.sampling rule (pipelines/federated/sampling.py)
    from the seed, or under central DP from the run's secret (privacy.NoiseKey)."""
    gen = privacy.NoiseKey(secret, seed).rng("sample", round_, Stream.SAMPLE)
    return SAMPLERS[fed.sampling].draw(gen, n_clients, fed.fraction, fed.min_clients)


@dataclass
class FedState:
    theta: np.ndarray
    server_state: dict[str, np.ndarray]
    round: int = 0
    history: list[dict] = field(default_factory=list)
    dropped: int = 0
    stopped: str | None = None   # why training ended before federated.rounds, if it did


def initial_state(config: Config, theta: np.ndarray, n_clients: int) -> FedState:
    """Round 0: the server rule's state and, under DP, the clipping bound."""
    server = server_rule(config.federated).init_state(theta)
    return FedState(theta, {**server, **privacy.Dp.from_config(config, n_clients).init_state()})


RoundHook = Callable[[FedState, dict], None]


NO_ATTACK = Attack("none", 0.0, frozenset())


def local_epochs(fed: FederatedSection) -> dict[str, Any]:
    """FedAvg's client: E local epochs of mini-batches of B (and every server-side variant's)."""
    return {"local_epochs": fed.local_epochs, "batch_size": fed.local_batch_size, "mu": 0.0}


def proximal(fed: FederatedSection) -> dict[str, Any]:
    """FedProx: FedAvg's local training plus the proximal term mu/2 |theta - theta_round|^2."""
    return {**local_epochs(fed), "mu": fed.mu}


def one_full_batch(fed: FederatedSection) -> dict[str, Any]:
    """FedSGD: one gradient step on the client's whole local data set."""
    return {"local_epochs": 1, "batch_size": None, "mu": 0.0}


# how a strategy's clients train, where it differs from FedAvg's (the server side: server.STRATEGIES)
CLIENT_TRAINING: dict[str, Callable[[FederatedSection], dict[str, Any]]] = {
    "fedprox": proximal, "fedsgd": one_full_batch}


def client_round(config: Config, spec: Model, round_: int, release: Release | None = None,
                 attack: Attack = NO_ATTACK, run_id: str = "") -> clients.ClientRound:
    """What every client of round `round_` is told; `run_id` keys local DP's noise to the run."""
    fed, t = config.federated, config.trainer
    return clients.ClientRound(
        spec=spec, dtype=t.dtype, split=clients.ClientSplit(t.seed, fed.holdout_fraction),
        round=round_, **CLIENT_TRAINING.get(fed.strategy, local_epochs)(fed),
        optimizer=optimizer_from(config), release=release or Release(), attack=attack, run_id=run_id)


def attack_from(config: Config, n_clients: int) -> Attack:
    a = config.robust.attack
    return Attack(a.kind, a.scale, malicious_clients(config.trainer.seed, n_clients, a.fraction)
                  if a.kind != "none" else frozenset())


def smallest_round(config: Config) -> int:
    """Fewer sampled clients than this and a (Poisson) round cannot run: min_clients, 2 for secure
    aggregation's threshold, 3 for Krum."""
    needed = config.federated.min_clients
    if config.privacy.secure_aggregation:
        needed = max(needed, 2)
    if config.robust.rule in robust.KRUM:
        needed = max(needed, 3)
    return needed


def expected_per_round(fed: FederatedSection, n_clients: int) -> float:
    return SAMPLERS[fed.sampling].expected(n_clients, fed.fraction, fed.min_clients)


def check_setup(config: Config, n_clients: int) -> None:
    """What the config alone cannot check: settings that depend on how many clients there are."""
    per_round = expected_per_round(config.federated, n_clients)
    r = config.robust
    if r.rule in robust.KRUM:
        f = robust.byzantine_count(r.byzantine, r.attack.fraction, per_round)
        if per_round <= 2 * f + 2:
            raise ConfigError(
                f"robust.rule={r.rule} assumes more than 2f+2 clients per round; with f={f} "
                f"Byzantine clients (robust.byzantine, or robust.attack.fraction={r.attack.fraction} "
                f"of the {per_round:g} sampled) it needs more than {2 * f + 2}; sample more "
                "clients (federated.fraction) or lower f")
    p = config.privacy
    if p.secure_aggregation:
        try:
            secure_sum.threshold(int(per_round), p.secagg_threshold)
        except ValueError as exc:
            raise ConfigError(f"privacy.secagg_threshold={p.secagg_threshold} with {per_round:g} "
                              f"clients per round: {exc}") from None
    privacy.Dp.from_config(config, n_clients).check_startable()


@dataclass(frozen=True)
class Reports:
    """What the driver receives from a round's clients without secure aggregation: every update
    (under secure aggregation it receives a secure_round.SecureResult, sums only)."""

    reports: list[clients.ClientReport]

    @property
    def updates(self) -> list[np.ndarray]:
        return [d.update for d in self.reports]

    @property
    def counts(self) -> list[int]:
        return [d.n for d in self.reports]

    @property
    def within_clip(self) -> float:
        """The sum over clients of (within the clip) - 1/2, as secure aggregation adds it up."""
        return sum(float(bool(d.within_clip)) - 0.5 for d in self.reports)


def robust_rule(config: Config, per_round: float) -> privacy.Aggregate:
    """The robust rule (by default the sample-weighted mean) over the reported updates."""
    r = config.robust
    f = robust.byzantine_count(r.byzantine, r.attack.fraction, per_round)
    bound = config.privacy.clip if config.privacy.clip is not None else math.inf
    return lambda got, state, round_: robust.aggregate(r.rule, got.updates, got.counts,
                                                       r.trim_fraction, f, bound)


def secure_mean(got: secure_round.SecureResult, state: dict, round_: int) -> np.ndarray:
    return got.weighted_sum / got.weight_sum


def reported_sum(got: Reports, state: dict, round_: int) -> np.ndarray:
    return np.stack(got.updates).sum(axis=0, dtype=np.float64)


def secure_total(got: secure_round.SecureResult, state: dict, round_: int) -> np.ndarray:
    """The sum secure aggregation reveals; unweighted when the clients were told so (central DP)."""
    return got.weighted_sum


def aggregator(config: Config, dp: privacy.Dp, per_round: float, key: privacy.NoiseKey
               ) -> privacy.Aggregate:
    """The round's aggregation from what the driver receives: the robust rule, or the mean secure
    aggregation reveals; under central DP, the CentralDP wrapper around the plain sum instead."""
    secure = config.privacy.secure_aggregation
    if dp.central:
        return privacy.CentralDP(dp, key, secure_total if secure else reported_sum)
    return secure_mean if secure else robust_rule(config, per_round)


@dataclass(frozen=True)
class RoundResult:
    """What a round's client training gave the driver: who reported and who dropped, the
    aggregate update (None when nobody reported), the reporters' sample-weighted mean training
    loss and summed training time, the bytes the clients sent up, and, under secure aggregation
    without DP, how many reported updates were clipped to its bound. Under secure aggregation the
    driver learns only these sums, never a client's own."""

    reported: list[int]
    dropped: list[clients.Dropped]
    aggregate: np.ndarray | None
    train_loss: float | None
    client_seconds: float
    bytes_up: int
    clipped: int | None = None


def train_clients(sc: SparkContext, config: Config, c: Clients, task: clients.ClientRound,
                  state: FedState, sampled: list[int], dp: privacy.Dp, aggregate: privacy.Aggregate
                  ) -> RoundResult:
    """Run the round's client training. Under secure aggregation the driver only learns sums."""
    if not sampled:
        return RoundResult([], [], None, None, 0.0, 0)
    p, r = config.privacy, task.round
    if not p.secure_aggregation:
        reports, dropped = run_round(sc, c, task, state.theta, sampled)
        if not reports:
            return RoundResult([], dropped, None, None, 0.0, 0)
        loss = float(np.average([d.train_loss for d in reports], weights=[d.n for d in reports]))
        return RoundResult([d.client for d in reports], dropped, aggregate(Reports(reports), state.server_state, r),
                           loss, float(sum(d.seconds for d in reports)),
                           int(sum(d.update.nbytes for d in reports)))
    res = secure_round.run_secure_round(sc, c, task, state.theta, sampled, p.secagg_threshold,
                                        p.ring_bits, weighted=not dp.central)
    # sum of (within - 1/2) over n survivors = within - n/2, so n/2 - it counts the clipped
    clipped = None if dp.enabled else int(round(len(res.survivors) / 2 - res.within_clip))
    return RoundResult(res.survivors, res.dropped, aggregate(res, state.server_state, r),
                       res.loss_sum / res.weight_sum, res.seconds_sum, res.bytes_up, clipped)


def server_rule(fed: FederatedSection) -> ServerRule:
    return ServerRule(fed.strategy, fed.server_lr, fed.server_momentum, fed.tau)


def run_round(sc: SparkContext, c: Clients, task: clients.ClientRound, theta: np.ndarray,
              sampled: list[int], update: Callable = clients.client_update
              ) -> tuple[list[clients.ClientReport], list[clients.Dropped]]:
    """Train the sampled clients, one task each; (reports, dropped). A report whose update or loss is
    not finite (a broken or hostile client) is dropped here, before any aggregation rule sees it."""
    bc = sc.broadcast(theta)
    try:
        results = c.run(lambda h: sc.runJob(h, partial(update, task=task, weights=bc), sampled))
    finally:
        bc.destroy()
    reports, dropped = [], []
    for r in results:
        if isinstance(r, clients.Dropped):
            dropped.append(r)
        elif isinstance(r, clients.ClientReport) and not finite(r):
            dropped.append(clients.Dropped(r.client, "its update is not finite (NaN or inf)"))
        elif isinstance(r, clients.ClientReport):
            reports.append(r)
    return reports, dropped


def finite(report: clients.ClientReport) -> bool:
    return bool(np.isfinite(report.update).all()) and math.isfinite(report.train_loss)


def federated_eval(sc: SparkContext, c: Clients, spec: Model, dtype: str, split: clients.ClientSplit,
                   theta: np.ndarray) -> tuple[dict[str, float], list[float]]:
    """Each client's accuracy on its own hold-out, in client order, and their mean, 10th percentile
    and minimum: one job of one task per task slot, each evaluating the clients whose handles
    coalesce into it (Spark groups them by the executor host that caches them, so each task reads
    blocks on its own host's disk)."""
    bc = sc.broadcast(theta)
    evaluate_clients = partial(clients.clients_evaluate, spec=spec, dtype=dtype, split=split, weights=bc)
    try:
        per_client = c.run(lambda h: h.coalesce(min(sc.defaultParallelism, h.getNumPartitions()))
                           .mapPartitions(evaluate_clients).collect())
    finally:
        bc.destroy()
    if not per_client:
        return {}, []
    acc = np.array([sums[2] / sums[0] for _, sums in sorted(per_client, key=lambda p: p[0])])
    return ({"mean": float(acc.mean()), "p10": float(np.percentile(acc, 10)), "min": float(acc.min())},
            acc.tolist())


def fit(sc: SparkContext, config: Config, c: Clients, test: Blocks | None, spec: Model, state: FedState,
        on_round: RoundHook, client_eval: bool = True, *,
        run_id: str, noise_secret: bytes | None = None) -> FedState:
    """Run the remaining rounds; every eval_every rounds (and the last) evaluate globally and per
    client, and hand each round's record to `on_round`. Under federated.stop_at_target the run ends
    at the first evaluated round reaching federated.target_accuracy, and a resumed run whose history
    already reached it runs no round at all.

    `client_eval=False` skips the per-client evaluation (every client's hold-out) when only the
    global test accuracy is wanted. `run_id` (the run's id) binds
    each client's local-DP noise to this run (udfs/federated/noise.py); `noise_secret`, the
    run's secret for central DP's noise and sampling (None: from the seed; privacy.needs_secret)."""
    fed, t = config.federated, config.trainer
    rule = server_rule(fed)
    dp = privacy.Dp.from_config(config, c.count)
    attack = attack_from(config, c.count)
    per_round = expected_per_round(fed, c.count)
    key = privacy.NoiseKey(noise_secret, t.seed)
    aggregate_round = aggregator(config, dp, per_round, key)
    split = clients.ClientSplit(t.seed, fed.holdout_fraction)
    state.stopped = state.stopped or target_stop(fed, state.history)
    while state.stopped is None and state.round < fed.rounds:
        started = time.perf_counter()
        r = state.round + 1
        if not dp.may_run(r):
            state.stopped = (f"privacy budget: round {r} would take epsilon to "
                             f"{dp.epsilon_after(r):.3f} > privacy.target_epsilon={dp.target_epsilon}")
            break
        sampled = sample(fed, r, c.count, t.seed, noise_secret)
        record: dict = {"round": r, "clients": len(sampled)}
        if SAMPLERS[fed.sampling].varies and len(sampled) < smallest_round(config):
            # data-independent: skipping reveals only the sample size; DP still counts the round
            record["skipped"] = f"{len(sampled)} client(s) sampled, fewer than a round needs"
            sampled = []
        clip = config.privacy.secure_clip if config.privacy.secure_aggregation else None
        task = client_round(config, spec, r, dp.release(state.server_state, clip), attack, run_id)
        got = train_clients(sc, config, c, task, state, sampled, dp, aggregate_round)
        dropped = got.dropped
        if got.clipped is not None:
            record["clipped"] = got.clipped
        if sampled and len(got.reported) < fed.min_clients:
            reasons = "; ".join(f"{c.names[d.client]}: {d.reason}" for d in dropped[:3])
            raise RuntimeError(f"round {r}: only {len(got.reported)} of {len(sampled)} sampled clients "
                               f"reported, fewer than federated.min_clients={fed.min_clients} "
                               f"(dropped: {reasons})")
        record.update({"reported": len(got.reported), "dropped": [c.names[d.client] for d in dropped]})
        if got.aggregate is not None:
            state.theta = rule.apply(state.theta, got.aggregate, state.server_state)
            if not dp.enabled and got.train_loss is not None:  # outside the DP accounting
                record["train_loss"] = got.train_loss
        if dp.enabled:
            record["epsilon"] = dp.epsilon_after(r)
            record["clip"] = float(state.server_state["clip"][0])
        state.dropped += len(dropped)
        record["bytes_down"] = int(state.theta.nbytes * len(sampled))
        record["bytes_up"] = got.bytes_up
        last = r == fed.rounds or not dp.may_run(r + 1)
        if r % fed.eval_every == 0 or last:
            evaluated = time.perf_counter()
            if test is not None:
                test_metrics = evaluate(sc, test, spec, t.dtype, state.theta, ("test",),
                                        t.aggregation_depth).get("test", {})
                record.update({f"test_{k}": v for k, v in test_metrics.items() if k != "rows"})
            if client_eval and not dp.enabled:
                by_clients = time.perf_counter()
                record["client_accuracy"], record["client_accuracies"] = federated_eval(
                    sc, c, spec, t.dtype, split, state.theta)
                record["client_eval_seconds"] = time.perf_counter() - by_clients
            record["eval_seconds"] = time.perf_counter() - evaluated
        record["seconds"] = time.perf_counter() - started
        record["client_seconds"] = got.client_seconds
        state.round = r
        state.history.append(record)
        on_round(state, record)
        state.stopped = target_stop(fed, state.history)
    return state


def reached_target(fed: FederatedSection, history: list[dict]) -> int | None:
    """The first evaluated round whose test accuracy is at or above federated.target_accuracy; None
    without a target or before any round reached it."""
    if fed.target_accuracy is None:
        return None
    return next((h["round"] for h in history if h.get("test_accuracy", -1.0) >= fed.target_accuracy),
                None)


def target_stop(fed: FederatedSection, history: list[dict]) -> str | None:
    """Why a federated.stop_at_target run ends here (FedState.stopped), or None to go on."""
    reached = reached_target(fed, history) if fed.stop_at_target else None
    if reached is None:
        return None
    return f"reached federated.target_accuracy={fed.target_accuracy} at round {reached}"


def summary_fields(config: Config, c: Clients, state: FedState) -> dict:
    """What the summary line adds for a federated run (CONTRACT.md)."""
    fed = config.federated
    by_round = [[h["round"], h["test_accuracy"]] for h in state.history if "test_accuracy" in h]
    last_clients: dict[str, float] = next((h["client_accuracy"] for h in reversed(state.history)
                         if h.get("client_accuracy")), {})
    out = {
        "rounds": state.round,
        "clients": c.count,
        "sampled_per_round": float(np.mean([h["clients"] for h in state.history])) if state.history else 0.0,
        "client_accuracy": last_clients,
        "test_accuracy_by_round": by_round,
        "target_accuracy": fed.target_accuracy,
        "rounds_to_target": reached_target(fed, state.history),
        "dropped_clients": state.dropped,
        **({"stopped": state.stopped} if state.stopped else {}),
        "federated": {"strategy": fed.strategy, "partitioner": fed.partitioner,
                      "sampling": fed.sampling, "fraction": fed.fraction,
                      "local_epochs": fed.local_epochs, "local_batch_size": fed.local_batch_size},
    }
    p, r = config.privacy, config.robust
    dp = privacy.Dp.from_config(config, c.count)
    if dp.enabled or p.secure_aggregation:
        out["privacy"] = dp.summary(state.round, state.server_state,
                                    p.secure_clip if p.secure_aggregation else None)
    if r.rule != "mean" or r.attack.kind != "none":
        out["robustness"] = {"rule": r.rule, "attack": r.attack.kind,
                             "malicious_fraction": r.attack.fraction}
    return out
