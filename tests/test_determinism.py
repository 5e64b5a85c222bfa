"""A float32 job repeated on one machine gives bit-identical weights, for every strategy that
reduces on the driver: each partition's (or cell's, or client's) result is added in partition order,
never in the order the tasks finished or the shuffle delivered them.

Eight partitions with aggregation_depth 2 make the partition sums pass a level of the reduction
tree (a shuffle), and model_parallel's three row blocks send gradient contributions through one
(three: two terms add the same in either order). Federated clients' updates are averaged in float64,
so their order could not show in float32 weights; the test still pins the whole job."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import blobs, train_and_load, write_table

COMMON = ["trainer.dtype=float32", "trainer.epochs=1", "trainer.batch_size=128",
          "data.validation_fraction=0.1", "trainer.seed=3"]
STRATEGIES = {
    "sync": ["trainer.strategy=sync", "data.partitions=8", "trainer.aggregation_depth=2",
             "model.kind=mlp", "model.hidden=[8]"],
    "local": ["trainer.strategy=local", "data.partitions=8", "trainer.aggregation_depth=2",
              "trainer.average_every=4", "model.kind=mlp", "model.hidden=[8]"],
    "federated": ["trainer.strategy=federated", "federated.clients=8", "federated.fraction=0.5",
                  "federated.rounds=2", "federated.local_epochs=1", "federated.local_batch_size=16",
                  "federated.strategy=fedadam", "model.kind=mlp", "model.hidden=[8]"],
    "model_parallel": ["trainer.strategy=model_parallel", "model_parallel.shards=2",
                       "data.partitions=3", "trainer.batch_size=256", "model.kind=mlp", "model.hidden=[8]"],
}


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("determinism")
    X, y, split = blobs(1200, 9, 3, seed=21)
    write_table(spark, path, "blobs", X, y, split)
    return path


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_repeated_float32_run_gives_bit_identical_weights(lake, tmp_path, capsys, strategy):
    argv = ["--set", f"lake.path={lake}", "--set", "data.table=blobs"]
    runs = [train_and_load(capsys, [*argv, "--set", f"runs.path={tmp_path / f'runs{i}'}"],
                           [*COMMON, *STRATEGIES[strategy]]) for i in range(2)]
    (first, a), (second, b) = runs
    assert a.dtype == np.float32 and first["strategy"] == strategy
    assert np.array_equal(a, b), f"largest difference {np.abs(a - b).max()}"
    assert first["test_accuracy"] == second["test_accuracy"]
