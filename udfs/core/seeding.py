"""Every random draw comes from a generator seeded by (run seed, purpose, step or round, partition
or client). A retried Spark task, a resumed run or another machine draws exactly the same numbers;
the global numpy RNG is never used."""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a generator is for; part of the seed, so two purposes never share a stream."""

    INIT = 1
    VALIDATION = 2
    SYNC_EPOCH = 3
    LOCAL_EPOCH = 4
    PARTITION = 5
    HOLDOUT = 6
    SAMPLE = 7
    ATTACK = 8
    DP_NOISE = 9
    CLIENT_NOISE = 10
    GENERATE = 11        # synthetic rows, per chunk of ids (udfs/data/synthetic.py)
    TRUTH = 12           # the true model of a synthetic table
    SPARSE_ROWS = 13     # wide sparse benchmark rows (udfs/data/synthetic.py, `vocabulary_rows`)


def rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """The generator for `stream` at (seed, *keys), e.g. rng(seed, Stream.LOCAL_EPOCH, epoch, part)."""
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])
