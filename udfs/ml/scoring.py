"""Scoring on the executors (a scalar pandas UDF over the features column): a model's predictions
for a whole Arrow batch at once, one matrix product per layer. The weights arrive in a Spark
broadcast, read once per Python worker."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from udfs.core import models, worker
from udfs.core.models import ModelSpec

if TYPE_CHECKING:
    from pyspark import Broadcast


@dataclass(frozen=True)
class Scoring:
    spec: ModelSpec
    column: str          # the features column, named in errors


def feature_matrix(features: pd.Series, scoring: Scoring) -> np.ndarray:
    """The batch's feature arrays as one matrix; a null or a row of another width is an error
    naming the column (the rows are only inspected one by one to say which, after stacking failed)."""
    width = scoring.spec.layers[0]
    if not len(features):
        return np.zeros((0, width))
    try:
        X = np.stack(features.to_numpy())
    except (TypeError, ValueError):
        X = None
    if X is not None and X.shape == (len(features), width):
        return X
    lengths = [-1 if row is None else len(row) for row in features]
    got = next(n for n in lengths if n != width)
    what = "a null" if got < 0 else f"a row of {got} values"
    raise ValueError(f"features column {scoring.column!r}: {what}, the model expects {width}")


def score_batch(features: pd.Series, scoring: Scoring, weights: Broadcast[np.ndarray]) -> pd.DataFrame:
    """prediction (class label as a double, or the predicted value) and, for classifiers, the class
    probabilities."""
    worker.prepare()
    spec, theta = scoring.spec, weights.value
    X = feature_matrix(features, scoring).astype(theta.dtype, copy=False)
    out = models.decision(spec, theta, X)
    frame = pd.DataFrame({"prediction": models.labels_from_decision(spec, out).astype(np.float64)})
    if spec.is_classifier:
        frame["probability"] = list(models.predict_proba(spec, theta, X))
    return frame


def scorer(scoring: Scoring, weights: Broadcast[np.ndarray]) -> Callable[[pd.Series], pd.DataFrame]:
    """score_batch bound to a model, with the type hints pandas_udf reads."""
    def score(features: pd.Series) -> pd.DataFrame:
        return score_batch(features, scoring, weights)
    return score
