"""PYTHONPATH=. python -m scripts.flower_fedavg JOB_DIR   (in Flower's venv; bench_federated.py starts it)

The peer of our federated rounds: Flower 1.42's simulation engine (Ray) running the job that
scripts/bench_federated.py's `flower` part writes to JOB_DIR (job.json, data.npz): FedAvg over the
same clients and rows, C, E and B, the same starting weights, and the same client maths, our
`udfs.federated.clients.train_client` (one BLAS thread, as in our tasks), one Ray actor a CPU; the
server evaluates the global model on the test set after every round (Flower's `evaluate_fn`).

It imports only `udfs` (its executor requirements are installed in Flower's venv beside flwr), never
`pipelines` or pyspark. The last stdout line is one JSON object: the seconds from the start to the
first central evaluation (set-up), each round's seconds (training, aggregation and the central
evaluation, from one evaluation to the next), the test accuracy by round and the seconds from the
start (after the imports) to the end; the caller times the whole process.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from udfs.core import worker
from udfs.core.models import ModelSpec
from udfs.core.optimizers import Optimizer
from udfs.federated.clients import ClientRound, ClientSplit, train_client
from udfs.training.tasks import metric_sums

STARTED = time.perf_counter()
JOB_ENV = "FEDSPARK_FLOWER_JOB"   # the job directory, for the Ray actors (they get the environment)


@dataclass(frozen=True)
class Job:
    """job.json: what bench_federated.py's `flower` part fixes for both ways."""

    spec: ModelSpec
    optimizer: Optimizer
    dtype: str
    seed: int
    holdout_fraction: float
    local_epochs: int
    batch_size: int
    clients: int
    fraction: float
    rounds: int
    cpus: int

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        raw = json.loads((job_dir / "job.json").read_text())
        return cls(**{**raw, "spec": ModelSpec(raw["spec"]["kind"], tuple(raw["spec"]["layers"])),
                      "optimizer": Optimizer(**raw["optimizer"])})


@lru_cache(maxsize=1)
def loaded(job_dir: str) -> tuple[Job, Any]:
    """The job and its arrays, read once per process (each Ray actor serves many clients)."""
    return Job.read(Path(job_dir)), np.load(Path(job_dir) / "data.npz", allow_pickle=False)


def client_data(data: Any, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s training rows: its slice of the rows stored client after client."""
    start, end = data["offsets"][client], data["offsets"][client + 1]
    return data["X"][start:end], data["y"][start:end]


def train(message: Any, context: Any) -> Any:
    """A client's round: E epochs of B-row mini-batches from the global weights, with our client code."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    worker.prepare()   # one BLAS thread, as in our client tasks
    job, data = loaded(os.environ[JOB_ENV])
    client = int(context.node_config["partition-id"])
    theta0 = message.content["arrays"].to_numpy_ndarrays()[0]
    task = ClientRound(spec=job.spec, dtype=job.dtype, split=ClientSplit(job.seed, job.holdout_fraction),
                       round=int(message.content["config"]["server-round"]), local_epochs=job.local_epochs,
                       batch_size=job.batch_size, optimizer=job.optimizer, mu=0.0)
    X, y = client_data(data, client)
    theta, loss, _ = train_client(task, client, theta0, X.astype(job.dtype, copy=False), y)
    reply = RecordDict({"arrays": ArrayRecord([theta]),
                        "metrics": MetricRecord({"num-examples": len(y), "train_loss": float(loss)})})
    return Message(reply, reply_to=message)


def main(job_dir: Path) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    os.environ[JOB_ENV] = str(job_dir)
    job, data = loaded(str(job_dir))
    X_test, y_test = data["X_test"].astype(job.dtype), data["y_test"]
    evaluated: list[float] = []
    accuracy: list[list[float]] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        theta = arrays.to_numpy_ndarrays()[0]
        n, loss, correct = metric_sums(job.spec, theta, X_test, y_test)[:3]
        evaluated.append(time.perf_counter())
        if server_round:
            accuracy.append([server_round, float(correct / n)])
        return MetricRecord({"accuracy": float(correct / n), "loss": float(loss / n)})

    from scripts import flower_fedavg  # by its module name, so Ray ships `train` by reference

    client_app = ClientApp()
    client_app.train()(flower_fedavg.train)
    server_app = ServerApp()

    @server_app.main()
    def serve(grid: Any, context: Any) -> None:
        strategy = FedAvg(fraction_train=job.fraction, fraction_evaluate=0.0,
                          min_available_nodes=job.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord([data["theta0"]]), num_rounds=job.rounds,
                       train_config=ConfigRecord(), evaluate_fn=central)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=job.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": job.cpus, "include_dashboard": False}})
    return {"setup_seconds": round(evaluated[0] - STARTED, 3),
            "round_seconds": [round(b - a, 3) for a, b in zip(evaluated, evaluated[1:], strict=False)],
            "test_accuracy_by_round": accuracy,
            "whole_seconds": round(time.perf_counter() - STARTED, 3)}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
