"""Private and robust federated training: robust rules against independent references, simulated
attacks, DP-FedAvg's clipping, noise and accounting (checked against dp-accounting itself), and
secure aggregation rounds on real Spark partitions, including what the driver gets to see."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

from pipelines import train
from pipelines.core.cli import main_wrapper
from pipelines.core.config import config_from_dict
from pipelines.federated import privacy, robust, rounds, secure_round
from pipelines.federated.clients import prepare_clients
from pipelines.training import runners
from tests.conftest import write_table
from udfs.federated import attacks, secagg, secure_clients
from udfs.federated.clients import Dropped
from udfs.federated.noise import Release

N, D, K = 400, 6, 3


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("privlake")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X[:, :K] + 0.2 * rng.normal(size=(N, K))).argmax(axis=1)
    write_table(spark, path, "priv", X, y, np.where(np.arange(N) % 4 == 0, "test", "train"))
    return path


def _config(lake: Path, **sections):
    base: dict[str, dict[str, Any]] = {"lake": {"path": str(lake)}, "data": {"table": "priv"},
            "model": {"kind": "softmax", "init": "zeros"},
            "trainer": {"strategy": "federated", "dtype": "float64",
                        "optimizer": {"name": "sgd", "lr": 0.5}},
            "federated": {"clients": 10, "fraction": 1.0, "local_epochs": 1, "local_batch_size": 16,
                          "rounds": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


# --- robust rules --------------------------------------------------------------------------------

def _updates(seed=0, n=9, d=5):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_median_and_trimmed_mean_match_independent_references():
    U = _updates()
    med = robust.aggregate("median", list(U), [1] * 9, 0.0, 0)
    for j in range(U.shape[1]):
        assert med[j] == statistics.median(U[:, j])
    trimmed = robust.aggregate("trimmed_mean", list(U), [1] * 9, 0.25, 0)
    np.testing.assert_allclose(trimmed, stats.trim_mean(U, 0.25, axis=0), rtol=1e-12)


def test_krum_and_multi_krum_match_a_brute_force_reference():
    U, f = _updates(1, n=8), 2
    scores = []
    for i in range(len(U)):
        d = sorted(float(np.sum((U[i] - U[j]) ** 2)) for j in range(len(U)) if j != i)
        scores.append(sum(d[:len(U) - f - 2]))
    best = int(np.argmin(scores))
    np.testing.assert_allclose(robust.aggregate("krum", list(U), [1] * 8, 0.0, f), U[best])
    chosen = sorted(range(len(U)), key=lambda i: scores[i])[:len(U) - f]
    counts = list(range(1, 9))
    expected = sum(counts[i] * U[i] for i in chosen) / sum(counts[i] for i in chosen)
    np.testing.assert_allclose(robust.aggregate("multi_krum", list(U), counts, 0.0, f), expected)


def test_norm_bound_scales_large_updates_down_to_the_bound():
    U = np.array([[3.0, 4.0], [0.6, 0.8], [0.0, 1.0]])  # norms 5, 1, 1
    out = robust.aggregate("norm_bound", list(U), [1, 1, 1], 0.0, 0, bound=1.0)
    np.testing.assert_allclose(out, (np.array([0.6, 0.8]) + U[1] + U[2]) / 3)


def test_robust_rules_resist_sign_flipped_updates_that_wreck_the_mean():
    rng = np.random.default_rng(2)
    honest = 1.0 + 0.1 * rng.normal(size=(8, 50))
    bad = -10 * honest[:2]
    U, counts = list(np.vstack([honest, bad])), [10] * 10
    assert np.linalg.norm(robust.aggregate("mean", U, counts, 0, 0) - 1.0) > 10
    for rule, trim in (("median", 0.0), ("trimmed_mean", 0.2), ("multi_krum", 0.0), ("krum", 0.0)):
        assert np.linalg.norm(robust.aggregate(rule, U, counts, trim, 2) - 1.0) < 1.0, rule


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_krum_never_chooses_an_update_that_is_not_finite(bad):
    rows = _updates(n=9)
    rows[0] = bad    # the first row: an argmin over NaN scores would pick it
    for rule in ("krum", "multi_krum"):
        assert np.isfinite(robust.aggregate(rule, list(rows), [1] * 9, 0.0, 1)).all(), rule


def test_a_client_whose_update_is_not_finite_is_dropped_before_any_rule(spark, lake):
    """Clients 0 and 1 send updates scaled by inf (what a hostile or broken client can send, past
    its own library's finiteness check): the driver drops both, and the rule sees only the rest."""
    config = _config(lake)
    c, test = prepare_clients(spark, config)
    try:
        spec = runners.model_spec(config, c.n_features, c.n_classes)
        hostile = attacks.Attack("scale", float("inf"), frozenset({0, 1}))
        task = rounds.client_round(config, spec, 1, None, hostile)
        reports, dropped = rounds.run_round(spark.sparkContext, c, task,
                                            runners.initial_theta(config, spec), list(range(c.count)))
        assert sorted(d.client for d in dropped) == [0, 1]
        assert all("not finite" in d.reason for d in dropped)
        assert sorted(r.client for r in reports) == list(range(2, c.count))
        assert all(np.isfinite(r.update).all() for r in reports)
    finally:
        c.release()
        if test is not None:
            test.release()


def test_attacks_pick_a_seeded_share_of_clients_and_tamper_as_named():
    bad = attacks.malicious_clients(0, 50, 0.2)
    assert len(bad) == 10 and bad == attacks.malicious_clients(0, 50, 0.2)
    assert bad != attacks.malicious_clients(1, 50, 0.2)
    u, victim = np.ones(4, np.float32), next(iter(bad))
    honest = next(i for i in range(50) if i not in bad)
    flip = attacks.Attack("sign_flip", 10.0, bad)
    np.testing.assert_array_equal(flip.tamper(victim, u, 0, 1), -10 * u)
    np.testing.assert_array_equal(flip.tamper(honest, u, 0, 1), u)
    np.testing.assert_array_equal(attacks.Attack("scale", 3.0, bad).tamper(victim, u, 0, 1), 3 * u)
    noise = attacks.Attack("noise", 2.0, bad).tamper(victim, np.zeros(20000), 0, 1)
    assert abs(noise.std() - 2.0) < 0.05
    labels = attacks.Attack("label_flip", 0.0, bad).labels(victim, np.array([0, 1, 2]), 3)
    np.testing.assert_array_equal(labels, [2, 1, 0])


# --- differential privacy ------------------------------------------------------------------------

@pytest.mark.parametrize("q,z,rounds", [(0.1, 1.0, 100), (0.2, 0.8, 30), (0.05, 2.0, 1000)])
def test_epsilon_matches_dp_accounting(q, z, rounds):
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert privacy.epsilon(q, z, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_central_noise_on_the_sum_has_std_z_times_clip(lake):
    config = _config(lake, privacy={"dp": "central", "noise_multiplier": 1.5, "clip": 0.7},
                     federated={"sampling": "poisson", "fraction": 0.3})
    dp = privacy.Dp.from_config(config, 10)
    state = dp.init_state()
    draws = np.concatenate([dp.noisy_mean(np.zeros(2000), state, privacy.NoiseKey(None, 0), r) * (0.3 * 10)
                            for r in range(1, 51)])
    assert abs(draws.std() - 1.5 * 0.7) < 0.01 and abs(draws.mean()) < 0.01


def test_adaptive_clipping_noise_split_and_clip_moves(lake):
    config = _config(lake, privacy={"dp": "central", "noise_multiplier": 1.0, "adaptive_clip": True,
                                      "clip": 1.0},
                     federated={"sampling": "poisson", "fraction": 1.0})
    dp = privacy.Dp.from_config(config, 10)
    sigma_b = max(10 / 20, 1.0)
    assert dp.update_noise_multiplier == pytest.approx((1.0 ** -2 - (2 * sigma_b) ** -2) ** -0.5)
    shrunk, grown = dp.init_state(), dp.init_state()
    dp.adapt_clip(10 * 0.5, shrunk, privacy.NoiseKey(None, 0), 1)    # every client within the clip: fraction ~1 > 0.5
    dp.adapt_clip(10 * -0.5, grown, privacy.NoiseKey(None, 0), 1)    # none within: fraction ~0 < 0.5
    # C * exp(-0.2 * (fraction - 0.5)), the fraction estimated with noise of std sigma_b / 10
    assert 0.87 < shrunk["clip"][0] < 0.94 and 1.06 < grown["clip"][0] < 1.15


def test_dp_clients_send_updates_clipped_to_the_bound(spark, lake):
    config = _config(lake, privacy={"dp": "central", "clip": 0.05}, federated={"sampling": "poisson"})
    c, test = prepare_clients(spark, config)
    try:
        spec = runners.model_spec(config, c.n_features, c.n_classes)
        dp = privacy.Dp.from_config(config, c.count)
        task = rounds.client_round(config, spec, 1, dp.release(dp.init_state(), None))
        reports, _ = rounds.run_round(spark.sparkContext, c, task, np.zeros(spec.n_params),
                                         list(range(c.count)))
        norms = [np.linalg.norm(r.update) for r in reports]
        assert len(norms) == 10 and max(norms) <= 0.05 + 1e-12
        assert min(norms) > 0.049  # the bound binds: these updates were longer
    finally:
        c.release()
        if test is not None:
            test.release()


def _run(lake, tmp_path, capsys, *sets):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path}", "--set", "data.table=priv",
            "--set", "trainer.strategy=federated", "--set", "federated.clients=10",
            "--set", "model.kind=softmax", "--set", "trainer.optimizer.name=sgd",
            "--set", "trainer.optimizer.lr=0.5", "--set", "federated.local_epochs=1",
            "--set", "trainer.dtype=float64"]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    code = main_wrapper(train.main, argv)
    out = capsys.readouterr()
    return code, out


def test_target_epsilon_stops_before_the_budget_is_crossed(lake, tmp_path, capsys):
    q, z = 0.5, 1.0

    def eps(r):
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), r)
        return acc.get_epsilon(1e-5)

    target = (eps(3) + eps(4)) / 2
    code, out = _run(lake, tmp_path, capsys, "privacy.dp=central", "federated.sampling=poisson",
                     "privacy.clip=1.0", f"federated.fraction={q}", f"privacy.noise_multiplier={z}",
                     "federated.rounds=10",
                     f"privacy.target_epsilon={target}", "privacy.adaptive_clip=true",
                     "federated.eval_every=5")
    assert code == 0, out.err[-2000:]
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["rounds"] == 3 and "privacy budget" in summary["stopped"]
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(eps(3), rel=1e-9) and p["epsilon"] <= target
    assert p["dp"] == "central" and p["delta"] == 1e-5 and p["noise_multiplier"] == z
    assert p["clip"] != 1.0  # adaptive clipping moved it
    assert summary["test_accuracy"] is not None  # the final model was evaluated


@pytest.mark.parametrize("sets,needle", [
    (["privacy.dp=central", "federated.sampling=poisson", "privacy.noise_multiplier=0.3",
      "privacy.clip=1.0", "privacy.target_epsilon=0.01"], "privacy.target_epsilon=0.01 cannot be met"),
    (["robust.rule=krum", "federated.fraction=0.5", "robust.attack.kind=sign_flip",
      "robust.attack.fraction=0.3"], "more than 2f+2"),
    (["privacy.secure_aggregation=true", "robust.rule=trimmed_mean"], "robust.rule='trimmed_mean'"),
    (["privacy.dp=central"], "federated.sampling=poisson"),
    (["privacy.adaptive_clip=true"], "privacy.adaptive_clip needs privacy.dp=central"),
    (["privacy.secure_aggregation=true", "federated.fraction=0.1", "federated.min_clients=1"],
     "privacy.secagg_threshold"),
])
def test_bad_privacy_and_robustness_settings_stop_before_training(lake, tmp_path, capsys, sets, needle):
    code, out = _run(lake, tmp_path, capsys, *sets)
    assert code == 2 and needle in out.err, out.err[-1500:]
    assert "round 1/" not in out.out


def test_a_sign_flip_attack_breaks_fedavg_but_not_the_median(lake, tmp_path, capsys):
    attack = ["robust.attack.kind=sign_flip", "robust.attack.fraction=0.2", "robust.attack.scale=10",
              "federated.rounds=5", "federated.fraction=1.0"]
    results = {}
    for name, sets in (("clean", ["federated.rounds=5", "federated.fraction=1.0"]),
                       ("mean", attack), ("median", [*attack, "robust.rule=median"])):
        code, out = _run(lake, tmp_path / name, capsys, *sets)
        assert code == 0, out.err[-2000:]
        results[name] = json.loads(out.out.strip().splitlines()[-1])
    assert results["median"]["robustness"] == {"rule": "median", "attack": "sign_flip",
                                               "malicious_fraction": 0.2}
    clean = results["clean"]["test_accuracy"]
    assert clean > 0.8
    assert results["mean"]["test_accuracy"] < clean - 0.2
    assert results["median"]["test_accuracy"] > clean - 0.05


# --- secure aggregation --------------------------------------------------------------------------

def _secure(spark, lake, phases=None, clip=100.0, hidden=None):
    phases = phases or secure_round.Phases()
    model = {"kind": "mlp", "hidden": hidden, "init": "glorot_uniform"} if hidden else {}
    config = _config(lake, privacy={"secure_aggregation": True, "clip": clip}, model=model)
    c, test = prepare_clients(spark, config)
    spec = runners.model_spec(config, c.n_features, c.n_classes)
    theta = runners.initial_theta(config, spec)
    task = rounds.client_round(config, spec, 1, Release(clip=clip))
    try:
        plain, _ = rounds.run_round(spark.sparkContext, c, task, theta, list(range(c.count)))
        secure = secure_round.run_secure_round(spark.sparkContext, c, task, theta, list(range(c.count)),
                                               config.privacy.secagg_threshold, config.privacy.ring_bits,
                                               weighted=True, phases=phases)
    finally:
        c.release()
        if test is not None:
            test.release()
    return plain, secure


def _weighted_sum(reports, clients):
    return sum(r.n * r.update for r in reports if r.client in clients)


@pytest.mark.parametrize("clip", [100.0, 0.01])  # not binding, and binding for every client
def test_secure_sum_equals_the_plain_weighted_sum(spark, lake, clip):
    plain, secure = _secure(spark, lake, clip=clip)
    assert all(np.linalg.norm(r.update) <= clip for r in plain)
    assert not secure.dropped and secure.survivors == list(range(10))
    expected = _weighted_sum(plain, set(range(10)))
    err = np.linalg.norm(secure.weighted_sum - expected) / np.linalg.norm(expected)
    assert err < 1e-6
    assert secure.weight_sum == sum(r.n for r in plain)
    # each client sent its id and the masked vector only; its n and loss reach the driver as sums
    assert all(set(vars(m)) == {"client", "masked"} for m in secure.received["masked"])
    assert secure.loss_sum == pytest.approx(sum(r.n * r.train_loss for r in plain), rel=1e-6)


def _dropping_after_masking(victims):
    def step(rows, task, weights, masking):
        for report in secure_clients.masked_update(rows, task, weights, masking):
            if report.client in victims:
                yield Dropped(report.client, "simulated loss after masking")
            else:
                yield report
    return step


@pytest.mark.parametrize("victims", [{3}, {0, 5, 9}])
def test_secure_sum_is_exact_when_clients_drop_after_masking(spark, lake, victims):
    plain, secure = _secure(spark, lake, secure_round.Phases(masked_update=_dropping_after_masking(victims)))
    survivors = set(range(10)) - victims
    assert set(secure.survivors) == survivors
    expected = _weighted_sum(plain, survivors)
    assert np.linalg.norm(secure.weighted_sum - expected) / np.linalg.norm(expected) < 1e-6


def test_a_secure_round_rebuilds_lost_blocks_and_sums_the_same(spark, lake):
    """Blocks lost before a secure round are rebuilt (new secrets, a fresh protocol run) and no
    client counts as dropped; a block lost while unmasking stops the round with a --resume hint."""
    from udfs.data import blocks

    config = _config(lake, privacy={"secure_aggregation": True, "clip": 100.0})
    c, test = prepare_clients(spark, config)
    sc, everyone = spark.sparkContext, list(range(c.count))
    spec = runners.model_spec(config, c.n_features, c.n_classes)
    theta, task = runners.initial_theta(config, spec), rounds.client_round(config, spec, 1, Release(clip=100.0))

    def secure(phases: secure_round.Phases | None = None) -> secure_round.SecureResult:
        return secure_round.run_secure_round(sc, c, task, theta, everyone, config.privacy.secagg_threshold,
                                             config.privacy.ring_bits, weighted=True,
                                             phases=phases or secure_round.Phases())

    def losing_its_block(step):
        def lost(rows, **kwargs):
            rows = list(rows)
            sum(blocks.remove_partition(iter(rows)))
            yield from step(iter(rows), **kwargs)
        return lost

    try:
        before = secure()
        c.handles.mapPartitions(blocks.remove_partition).count()   # the executors lose the files
        try:
            after = secure()
        except secagg.SecAggError as exc:
            pytest.fail(f"the round failed instead of rebuilding the blocks: {exc}")
        assert c.rebuilds == 1 and not after.dropped
        assert after.survivors == everyone
        np.testing.assert_array_equal(after.weighted_sum, before.weighted_sum)
        with pytest.raises(secagg.SecAggError, match="--resume continues it"):
            secure(secure_round.Phases(unmask_shares=losing_its_block(secure_clients.unmask_shares)))
        assert c.rebuilds == 1
    finally:
        c.release()
        if test is not None:
            test.release()


def test_secure_round_below_the_threshold_fails_clearly(spark, lake):
    with pytest.raises(secagg.SecAggError, match="below the threshold t=7"):
        _secure(spark, lake, secure_round.Phases(masked_update=_dropping_after_masking({0, 1, 2, 3})))


def test_the_driver_sees_only_uniform_masked_vectors_it_cannot_unmask(spark, lake):
    plain, first = _secure(spark, lake, hidden=[128])
    _, second = _secure(spark, lake, hidden=[128])  # same round, seed and data; new client secrets
    by_client = {r.client: r for r in plain}
    unit, scalars = secure_clients.coordinate_bound(Release(clip=100.0)), secure_clients.SCALARS
    masked = np.concatenate([d.masked[:-scalars] for d in first.received["masked"]])
    inputs = np.concatenate([
        secagg.encode(secure_clients.encoded_input(by_client[d.client], True, unit), first.scale)[:-scalars]
        for d in first.received["masked"]])
    assert len(masked) > 10000
    top = (masked >> np.uint64(56)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
    assert abs(np.corrcoef(masked.view(np.int64).astype(float), inputs.view(np.int64).astype(float))[0, 1]) < 0.05
    # fresh OS-entropy secrets: different keys and masks, the same sum
    assert first.received["keys"] != second.received["keys"]
    for a, b in zip(first.received["masked"], second.received["masked"], strict=False):
        assert not np.array_equal(a.masked, b.masked)
    np.testing.assert_array_equal(first.weighted_sum, second.weighted_sum)
    # with nobody dropped, the driver asked only for self-mask shares, never a mask key
    assert all(kind == "b" for answer in first.received["answers"].values() for kind, _ in answer.values())


def test_fedavg_with_and_without_secure_aggregation_end_at_the_same_weights(lake, tmp_path, capsys):
    """With a clip far above the updates, and with the defaults (no privacy.clip: only
    privacy.secagg_bound bounds the fixed point), though the updates' norms exceed 1."""
    weights, summaries = {}, {}
    for name, sets in (("plain", []), ("secure", ["privacy.secure_aggregation=true", "privacy.clip=100"]),
                       ("default", ["privacy.secure_aggregation=true"])):
        code, out = _run(lake, tmp_path / name, capsys, "federated.rounds=3", "federated.fraction=0.5",
                         "model.init=zeros", "trainer.optimizer.lr=2.0", *sets)
        assert code == 0, out.err[-2000:]
        summaries[name] = summary = json.loads(out.out.strip().splitlines()[-1])
        with np.load(Path(summary["model_path"]) / "weights.npz", allow_pickle=False) as z:
            weights[name] = z["theta"]
    # |theta_3| <= the sum of 3 rounds' mean update norms: some client's update norm was above 1
    assert np.linalg.norm(weights["plain"]) > 3
    for name in ("secure", "default"):
        assert summaries[name]["privacy"]["secure_aggregation"] is True
        err = np.linalg.norm(weights[name] - weights["plain"]) / np.linalg.norm(weights["plain"])
        assert err < 1e-6, name
    assert summaries["default"]["privacy"]["clip"] == 1.0e4   # privacy.secagg_bound


def test_local_dp_clients_noise_their_own_updates(spark, lake):
    config = _config(lake, privacy={"dp": "local", "noise_multiplier": 2.0, "clip": 0.5},
                     model={"kind": "mlp", "hidden": [64], "init": "glorot_uniform"},
                     trainer={"optimizer": {"name": "sgd", "lr": 1e-12}})
    c, test = prepare_clients(spark, config)
    try:
        spec = runners.model_spec(config, c.n_features, c.n_classes)
        dp = privacy.Dp.from_config(config, c.count)
        task = rounds.client_round(config, spec, 1, dp.release(dp.init_state(), None))
        theta = runners.initial_theta(config, spec)
        reports, _ = rounds.run_round(spark.sparkContext, c, task, theta, [0, 1, 2, 3])
        noise = np.concatenate([r.update for r in reports])  # the trained part is ~1e-12
        assert abs(noise.std() - 2.0 * 0.5) < 0.03
        accountant = rdp.RdpAccountant()  # no subsampling, sensitivity 2C: multiplier z/2
        accountant.compose(dp_accounting.GaussianDpEvent(1.0), 3)
        assert dp.epsilon_after(3) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        again, _ = rounds.run_round(spark.sparkContext, c, task, theta, [0, 1, 2, 3])
        for a, b in zip(reports, again, strict=True):  # keyed by (client secret, run, round): a retry is identical
            np.testing.assert_array_equal(a.update, b.update)
    finally:
        c.release()
        if test is not None:
            test.release()


def test_the_driver_cannot_rebuild_a_clients_local_noise(spark, lake):
    """Everything the driver and the run directory hold (the config and its seed, the round, the
    client ids, the run id) rebuilds none of a client's local-DP noise: subtracting any stream the
    seed defines leaves an update uncorrelated with the true one. Two runs draw different noise."""
    config = _config(lake, privacy={"dp": "local", "noise_multiplier": 1.0, "clip": 0.05},
                     model={"kind": "mlp", "hidden": [2000], "init": "glorot_uniform"})
    c, test = prepare_clients(spark, config)
    try:
        spec = runners.model_spec(config, c.n_features, c.n_classes)
        dp = privacy.Dp.from_config(config, c.count)
        theta = runners.initial_theta(config, spec)
        everyone = list(range(c.count))

        def updates(release: Release, run_id: str) -> np.ndarray:
            task = rounds.client_round(config, spec, 1, release, run_id=run_id)
            reports, _ = rounds.run_round(spark.sparkContext, c, task, theta, everyone)
            return np.stack([r.update for r in sorted(reports, key=lambda r: r.client)])

        release = dp.release(dp.init_state(), None)
        noisy, other_run = updates(release, "run-a"), updates(release, "run-b")
        clean = updates(Release(clip=release.clip), "run-a")   # the clipped updates, no noise
        assert noisy.shape == clean.shape == (c.count, spec.n_params)
        assert np.abs(noisy - other_run).min() > 0     # two runs: every coordinate's noise differs
        seed = config.trainer.seed
        for stream in range(1, 20):   # every seeded stream the driver could try
            guess = np.stack([np.random.default_rng([seed, stream, 1, k]).normal(
                0.0, release.noise_std, spec.n_params) for k in everyone])
            recovered = (noisy - guess).ravel()
            assert abs(np.corrcoef(recovered, clean.ravel())[0, 1]) < 0.05, stream
    finally:
        c.release()
        if test is not None:
            test.release()


def test_central_dp_with_secure_aggregation_trains_and_reports_both(lake, tmp_path, capsys):
    code, out = _run(lake, tmp_path, capsys, "privacy.secure_aggregation=true", "privacy.dp=central",
                     "federated.sampling=poisson", "federated.fraction=0.8", "federated.rounds=2",
                     "privacy.noise_multiplier=0.5", "privacy.adaptive_clip=true", "privacy.clip=1.0")
    assert code == 0, out.err[-2000:]
    summary = json.loads(out.out.strip().splitlines()[-1])
    p = summary["privacy"]
    assert p["secure_aggregation"] is True and p["dp"] == "central"
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.8, dp_accounting.GaussianDpEvent(0.5)), 2)
    assert p["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert summary["client_accuracy"] == {}  # per-client statistics are withheld under DP
    assert summary["rounds"] == 2 and summary["test_accuracy"] is not None


def test_central_dp_noise_comes_from_a_run_secret_a_resume_reads_back(lake, tmp_path, capsys):
    """Two runs of one config draw different noise and samples; the secret is mode 0600 beside the
    checkpoints and nowhere else the run publishes; a resumed run ends at the same model;
    privacy.reproducible_noise draws from the seed instead."""
    dp = ["privacy.dp=central", "federated.sampling=poisson", "federated.fraction=0.8", "privacy.clip=1.0",
          "privacy.noise_multiplier=0.5", "federated.rounds=2", "trainer.checkpoint_every=1",
          "federated.eval_every=2"]

    def trained(name: str, *sets: str) -> tuple[Path, np.ndarray]:
        code, out = _run(lake, tmp_path / name, capsys, *dp, *sets)
        assert code == 0, out.err[-2000:]
        run_dir = Path(json.loads(out.out.strip().splitlines()[-1])["run_dir"])
        with np.load(run_dir / "model" / "weights.npz", allow_pickle=False) as z:
            return run_dir, z["theta"].copy()

    (a, wa), (_, wb) = trained("a"), trained("b")
    assert not np.allclose(wa, wb)
    key = a / "checkpoints" / "noise.key"
    secret = key.read_bytes()
    assert len(secret) == 32 and key.stat().st_mode & 0o777 == 0o600
    published = [f for f in a.rglob("*") if f.is_file() and f != key]
    assert published and not [f for f in published if secret in f.read_bytes() or secret.hex().encode()
                               in f.read_bytes()]
    (a / "summary.json").unlink()   # as if the job died in round 2
    shutil.rmtree(a / "model")
    capsys.readouterr()
    assert main_wrapper(train.main, ["--resume", str(a)]) == 0, capsys.readouterr().err[-2000:]
    with np.load(a / "model" / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["theta"], wa)
    (r1, w1), (_, w2) = (trained(name, "privacy.reproducible_noise=true") for name in ("r1", "r2"))
    np.testing.assert_array_equal(w1, w2)
    assert not (r1 / "checkpoints" / "noise.key").exists()


def test_poisson_rounds_with_too_few_clients_are_skipped_not_failed(lake, tmp_path, capsys):
    code, out = _run(lake, tmp_path, capsys, "federated.sampling=poisson", "federated.fraction=0.15",
                     "federated.min_clients=2", "federated.rounds=8")
    assert code == 0, out.err[-2000:]
    summary = json.loads(out.out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert skipped and all(r["clients"] < 2 and r["reported"] == 0 for r in skipped)
    assert summary["rounds"] == 8
