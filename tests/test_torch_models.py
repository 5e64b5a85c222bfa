"""PyTorch modules (`model.kind: torch`) trained by `local`, `sync` and `federated`, in float64
against the numpy built-ins and against torch used directly in the test.

The numpy MLP lays a layer out as W (in x out, row-major) then b; torch's nn.Linear holds its weight
as (out x in). `to_numpy_layout` below converts a torch MLP's vector to the numpy one, written here
and not taken from the adapter."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipelines import evaluate, score, train
from pipelines.core.cli import main_wrapper
from pipelines.core.config import config_from_dict
from pipelines.data.lake import TableRef
from pipelines.federated import rounds, secure_round
from pipelines.federated.clients import prepare_clients
from pipelines.training import runners
from tests.conftest import fashion_mnist, train_and_load, write_table
from udfs import adapters
from udfs.core.models import ModelSpec
from udfs.federated.noise import Release

N, D, H, K = 157, 6, 5, 3
TORCH_MLP = ["model.kind=torch", "model.torch.module=udfs.adapters.torch_zoo:mlp",
             f"model.torch.kwargs={{in_features: {D}, hidden: [{H}], classes: {K}}}"]
NUMPY_MLP = ["model.kind=mlp", f"model.hidden=[{H}]"]


def _relayout(theta: np.ndarray, widths: list[int], to_torch: bool) -> np.ndarray:
    """Each layer's weight matrix transposed: torch's (out x in) <-> the numpy MLP's (in x out)."""
    parts, offset = [], 0
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        parts.append(theta[offset:offset + a * b].reshape((a, b) if to_torch else (b, a)).T.ravel())
        parts.append(theta[offset + a * b:offset + a * b + b])
        offset += a * b + b
    return np.concatenate(parts)


def to_numpy_layout(theta: np.ndarray, widths: list[int]) -> np.ndarray:
    """A torch MLP's [weight (out x in), bias] per layer as the numpy MLP's [W (in x out), b]."""
    return _relayout(theta, widths, to_torch=False)


def to_torch_layout(theta: np.ndarray, widths: list[int]) -> np.ndarray:
    return _relayout(theta, widths, to_torch=True)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("torchlake")
    rng = np.random.default_rng(42)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X[:, :K] + 0.5 * rng.normal(size=(N, K))).argmax(axis=1)
    write_table(spark, path, "small", X, y, split=np.where(np.arange(N) % 5 == 0, "test", "train"))
    return path


def run(lake, tmp_path, capsys, *sets):
    argv = ["--set", f"lake.path={lake}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", "data.table=small", "--set", "data.validation_fraction=0.0",
            "--set", "trainer.dtype=float64"]
    return train_and_load(capsys, argv, sets)


def test_torch_mlp_with_the_numpy_mlps_weights_gives_the_same_loss_and_gradient():
    widths = [D, 7, 4, K]
    spec = ModelSpec("mlp", tuple(widths))
    theta = spec.init(np.random.default_rng(3), "glorot_uniform", np.float64)
    model = adapters.build(adapters.ModelRequest("torch", D, K, torch=adapters.TorchRequest(
        "udfs.adapters.torch_zoo:mlp", {"in_features": D, "hidden": widths[1:-1], "classes": K},
        "cross_entropy")))
    assert model.n_params == spec.n_params
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(33, D)), rng.integers(0, K, 33)
    loss, grad = spec.loss_and_grad(theta, X, y)
    t_loss, t_grad = model.loss_and_grad(to_torch_layout(theta, widths), X, y)
    assert abs(loss - t_loss) <= 1e-6
    assert np.abs(to_numpy_layout(t_grad, widths) - grad).max() <= 1e-6
    np.testing.assert_array_equal(model.predict(to_torch_layout(theta, widths), X), spec.predict(theta, X))


@pytest.mark.parametrize(("loss", "n_classes", "classes", "needle"), [
    ("mse", 3, 1, "needs real-valued labels"),
    ("cross_entropy", 0, 3, "needs integer class labels"),
    ("cross_entropy", 3, 4, "returns shape (2, 4)"),
])
def test_a_module_that_does_not_fit_the_labels_is_refused(loss, n_classes, classes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        adapters.build(adapters.ModelRequest("torch", D, n_classes, torch=adapters.TorchRequest(
            "udfs.adapters.torch_zoo:mlp", {"in_features": D, "hidden": [H], "classes": classes}, loss)))


def test_sync_with_the_torch_mlp_equals_sync_with_the_numpy_mlp(lake, tmp_path, capsys):
    common = ["trainer.strategy=sync", "trainer.batch_size=17", "trainer.epochs=2", "data.partitions=2",
              "trainer.optimizer.lr=0.05"]
    numpy_summary, numpy_theta = run(lake, tmp_path / "numpy", capsys, *common, *NUMPY_MLP)
    torch_summary, torch_theta = run(lake, tmp_path / "torch", capsys, *common, *TORCH_MLP)
    assert torch_summary["model"]["kind"] == "torch"
    assert np.abs(to_numpy_layout(torch_theta, [D, H, K]) - numpy_theta).max() <= 1e-5
    assert abs(torch_summary["test_accuracy"] - numpy_summary["test_accuracy"]) <= 1e-9


def test_fedavg_with_one_client_and_one_epoch_equals_local_for_a_torch_model(lake, tmp_path, capsys):
    common = [*TORCH_MLP, "trainer.optimizer.name=sgd", "trainer.optimizer.lr=0.1"]
    _, fed = run(lake, tmp_path / "fed", capsys, *common, "trainer.strategy=federated",
                 "federated.partitioner=iid", "federated.clients=1", "federated.holdout_fraction=0.0",
                 "federated.fraction=1.0", "federated.min_clients=1", "federated.rounds=3",
                 "federated.local_epochs=1", "federated.local_batch_size=16")
    _, local = run(lake, tmp_path / "local", capsys, *common, "trainer.strategy=local", "data.partitions=1",
                   "trainer.epochs=3", "trainer.batch_size=16")
    assert np.abs(fed - local).max() <= 1e-10


def test_secure_aggregation_of_torch_updates_equals_the_plain_sum(spark, lake):
    config = config_from_dict({
        "lake": {"path": str(lake)}, "data": {"table": "small"},
        "model": {"kind": "torch", "torch": {"module": "udfs.adapters.torch_zoo:mlp",
                                             "kwargs": {"in_features": D, "hidden": [H], "classes": K}}},
        "trainer": {"strategy": "federated", "dtype": "float64", "optimizer": {"name": "sgd", "lr": 0.5}},
        "federated": {"clients": 4, "fraction": 1.0, "local_epochs": 1, "local_batch_size": 16, "rounds": 1},
        "privacy": {"secure_aggregation": True, "clip": 100.0}})
    c, test = prepare_clients(spark, config)
    spec = runners.model_spec(config, c.n_features, c.n_classes)
    theta = runners.initial_theta(config, spec)
    task = rounds.client_round(config, spec, 1, Release(clip=100.0))
    try:
        plain, _ = rounds.run_round(spark.sparkContext, c, task, theta, list(range(c.count)))
        secure = secure_round.run_secure_round(spark.sparkContext, c, task, theta, list(range(c.count)),
                                               config.privacy.secagg_threshold, config.privacy.ring_bits,
                                               weighted=True, phases=secure_round.Phases())
    finally:
        c.release()
        if test is not None:
            test.release()
    expected = sum(r.n * r.update for r in plain)
    assert np.linalg.norm(expected) > 0
    assert np.linalg.norm(secure.weighted_sum - expected) / np.linalg.norm(expected) < 1e-6


CONV_FILE = """
from torch import nn


def net(classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, classes))
"""


@pytest.fixture(scope="module")
def fmnist_slice(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("fmnistslice")
    X, y, split = fashion_mnist(every=50)   # 1,200 train and 200 test images
    write_table(spark, path, "fm", X, y, split)   # ids 0..n-1 in this order
    return path, np.flatnonzero(split == "test"), X[split == "test"], y[split == "test"]


def test_a_conv_module_from_a_file_trains_federated_and_its_state_dict_predicts_what_evaluate_scores(
        spark, fmnist_slice, tmp_path, capsys):
    lake_path, test_ids, X_test, y_test = fmnist_slice
    model_file = tmp_path / "convnet.py"
    model_file.write_text(CONV_FILE)
    summary, theta = train_and_load(capsys, [
        "--set", f"lake.path={lake_path}", "--set", f"runs.path={tmp_path / 'runs'}", "--set", "data.table=fm",
        "--set", "model.kind=torch", "--set", "model.torch.module=convnet:net",
        "--set", f"model.torch.file={model_file}", "--set", "model.input_shape=[1, 28, 28]",
        "--set", "trainer.strategy=federated", "--set", "federated.clients=4", "--set", "federated.fraction=1.0",
        "--set", "federated.rounds=2", "--set", "federated.local_epochs=1", "--set", "federated.local_batch_size=20",
        "--set", "trainer.optimizer.lr=0.005"])
    model_dir = Path(summary["model_path"])
    history = [json.loads(line) for line in (model_dir.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0]
    spec = json.loads((model_dir / "spec.json").read_text())
    assert spec["file_sha256"] == hashlib.sha256(CONV_FILE.encode()).hexdigest()
    assert (model_dir / "convnet.py").read_text() == CONV_FILE

    module = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(144, 10))
    module.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    assert sum(p.numel() for p in module.parameters()) == len(theta)
    with torch.no_grad():
        predicted = module.eval()(torch.from_numpy(X_test.reshape(-1, 1, 28, 28))).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())
    assert accuracy > 0.3

    capsys.readouterr()
    assert main_wrapper(evaluate.main, ["--model", str(model_dir.parent)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["test_rows"] == len(y_test)
    assert abs(scored["test_accuracy"] - accuracy) <= 1e-9
    assert abs(scored["test_accuracy"] - summary["test_accuracy"]) <= 1e-9

    # score.py's predictions on the executors are the reloaded module's
    score.score(spark, str(lake_path), str(model_dir.parent), TableRef("fm"), "fm_scores")
    rows = spark.read.format("delta").load(str(lake_path / "fm_scores")).select("id", "prediction").collect()
    by_id = {r.id: r.prediction for r in rows}
    np.testing.assert_array_equal([by_id[i] for i in test_ids], predicted)


BATCHNORM_FILE = f"""
from torch import nn


def net():
    return nn.Sequential(nn.Linear({D}, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, {K}))
"""


def test_a_module_with_batchnorm_trains_and_its_running_statistics_travel_in_the_vector(
        lake, tmp_path, capsys):
    model_file = tmp_path / "bnnet.py"
    model_file.write_text(BATCHNORM_FILE)
    summary, theta = run(lake, tmp_path, capsys, "model.kind=torch", "model.torch.module=bnnet:net",
                         f"model.torch.file={model_file}", "trainer.strategy=local", "data.partitions=2",
                         "trainer.epochs=2", "trainer.batch_size=16", "trainer.optimizer.lr=0.01")
    assert summary["test_accuracy"] > 0.5
    spec = json.loads((Path(summary["model_path"]) / "spec.json").read_text())
    offsets = np.cumsum([0] + [int(np.prod(t["shape"])) for t in spec["tensors"]])
    entries = {t["name"]: (t, theta[a:b]) for t, a, b in zip(spec["tensors"], offsets[:-1], offsets[1:], strict=True)}
    mean_entry, running_mean = entries["1.running_mean"]
    _, running_var = entries["1.running_var"]
    assert not mean_entry["trainable"]
    # a fresh BatchNorm starts at mean 0, variance 1: training moved both (averaged over partitions)
    assert np.abs(running_mean).max() > 1e-3 and np.abs(running_var - 1).max() > 1e-3
    state = load_file(str(Path(summary["model_path"]) / "model.safetensors"))
    np.testing.assert_array_equal(state["1.running_mean"].numpy(), running_mean)


@pytest.mark.parametrize("strategy", ["mllib", "model_parallel"])
def test_strategies_for_the_builtin_models_refuse_a_torch_model(strategy, tmp_path, capsys):
    argv = ["--set", f"runs.path={tmp_path}", "--set", f"trainer.strategy={strategy}"]
    for s in TORCH_MLP:
        argv += ["--set", s]
    capsys.readouterr()
    assert main_wrapper(train.main, argv) == 2
    err = capsys.readouterr().err
    assert f"trainer.strategy={strategy} cannot train model.kind=torch" in err
    assert "use local, sync or federated" in err
