"""Every random draw comes from a generator seeded by (run seed, purpose, step or round, partition
or client). A retried Spark task, a resumed run or another machine draws exactly the same numbers;
the global numpy RNG is never used.

Privacy noise is the exception: whoever knows the run seed (the driver, anyone who reads the run's
config or model) could rebuild a seeded draw and subtract it. Those draws come from `secret_rng`,
keyed by a secret that party never sees, and named by what they are for, so a retry still draws
the same numbers while the seed alone gives nothing."""
from __future__ import annotations

from enum import IntEnum

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


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
    GENERATE = 11        # synthetic rows, per chunk of ids (udfs/data/synthetic.py)
    TRUTH = 12           # the true model of a synthetic table
    SPARSE_ROWS = 13     # wide sparse benchmark rows (udfs/data/synthetic.py, `vocabulary_rows`)
    ESTIMATOR = 14       # a partial_fit estimator's random_state (udfs/adapters/sklearn_estimator.py)


def rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """The generator for `stream` at (seed, *keys), e.g. rng(seed, Stream.LOCAL_EPOCH, epoch, part)."""
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])


SECRET_BYTES = 32


def secret_rng(secret: bytes, purpose: str, *context: object) -> np.random.Generator:
    """A generator seeded by HKDF-SHA256 over `secret`, its info naming `purpose` and `context` (the
    run id, round, client): the same secret and context give the same draws, and without the
    secret they cannot be told from fresh entropy."""
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"a noise secret needs at least {SECRET_BYTES} bytes, got {len(secret)}")
    info = "/".join(["fedspark", purpose, *(str(c) for c in context)]).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(secret)
    return np.random.Generator(np.random.PCG64(int.from_bytes(key, "big")))
