"""A scikit-learn linear estimator with `partial_fit` as a `udfs.core.models.Model`.

The vector is the estimator's `coef_` (row-major, one row per class, or a single row for a binary
classifier or a regressor) then its `intercept_`. Such an estimator has no gradient fedspark could
reduce, so it trains through `local_fit`: a fresh estimator of the configured class and params is
given the vector's coef_ and intercept_ and calls `partial_fit` once per local epoch on the rows,
then the vector is read back; the driver averages the vectors (FedAvg, as Flower's scikit-learn
examples do). Each call starts scikit-learn's learning-rate schedule afresh (t_ = 1) and takes
`random_state` from the caller, which draws it from (seed, round or epoch, client or partition).

The fitted estimator itself is `estimator_with(theta)`: its arrays come from weights.npz, so a
saved model loads without pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn import linear_model

from udfs.core.models import Outputs

# model.sklearn.estimator: the classes fedspark can train, and whether each is a classifier
ESTIMATORS = {"SGDClassifier": True, "Perceptron": True, "PassiveAggressiveClassifier": True,
              "SGDRegressor": False}


def check_params(estimator: str, params: dict[str, Any]) -> None:
    """ValueError naming model.sklearn.params unless `estimator` accepts `params` (names, and the
    values scikit-learn's own parameter constraints allow)."""
    try:
        getattr(linear_model, estimator)(**params)._validate_params()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.sklearn.params={params} for {estimator}: {exc}") from None


@dataclass(frozen=True)
class SklearnModel(Outputs):
    estimator: str
    params_json: str          # the estimator's parameters as canonical JSON (hashable, picklable)
    n_features: int
    n_classes: int            # 0: a regressor

    kind = "sklearn"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"model.sklearn.estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if ESTIMATORS[self.estimator] and self.n_classes < 2:
            raise ValueError(f"model.sklearn.estimator={self.estimator} is a classifier and needs integer "
                             "class labels; use SGDRegressor")
        if not ESTIMATORS[self.estimator] and self.n_classes:
            raise ValueError(f"model.sklearn.estimator={self.estimator} is a regressor and needs real labels")
        check_params(self.estimator, self.params)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def _rows(self) -> int:
        """Rows of coef_: one per class, one for a binary classifier or a regressor."""
        return self.n_classes if self.n_classes > 2 else 1

    # --- Model -----------------------------------------------------------------------------------

    @property
    def head(self) -> str:
        return "softmax" if self.n_classes > 2 else "sigmoid" if self.n_classes else "identity"

    @property
    def n_params(self) -> int:
        return self._rows * (self.n_features + 1)

    @property
    def is_classifier(self) -> bool:
        return self.n_classes > 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "estimator": self.estimator, "params": self.params,
                "n_features": self.n_features, "n_classes": self.n_classes}

    def init(self, rng: np.random.Generator, init: str, dtype: npt.DTypeLike) -> np.ndarray:
        """Zeros, where scikit-learn's first partial_fit starts a linear model (draws nothing)."""
        return np.zeros(self.n_params, dtype=dtype)

    def loss_and_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        raise TypeError(f"{self.estimator} trains with partial_fit and has no gradient (use local_fit)")

    def decision(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """decision_function (one column per class, one for binary) or the regressor's prediction."""
        est = self.estimator_with(theta)
        out = est.decision_function(X) if self.is_classifier else est.predict(X)
        return np.asarray(out).reshape(len(X), -1)

    def files(self, theta: np.ndarray) -> dict[str, bytes]:
        return {}

    # --- LocalFit --------------------------------------------------------------------------------

    def local_fit(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, epochs: int,
                  random_state: int) -> tuple[np.ndarray, float]:
        """`epochs` calls of partial_fit on (X, y) from theta: the new vector and its mean loss
        (output_loss) on (X, y)."""
        est = self.estimator_with(theta, random_state, fitted=False)
        labels = y.astype(np.int64 if self.is_classifier else X.dtype, copy=False)
        for _ in range(epochs):
            if self.is_classifier:
                est.partial_fit(X, labels, classes=np.arange(self.n_classes))
            else:
                est.partial_fit(X, labels)
        fitted = self._vector(est, theta.dtype)
        return fitted, self.output_loss(self.decision(fitted, X), y) / max(len(y), 1)

    # --- the estimator ---------------------------------------------------------------------------

    def estimator_with(self, theta: np.ndarray, random_state: int = 0, fitted: bool = True) -> Any:
        """An estimator of the configured class holding theta as its coef_ and intercept_ (copies).
        `fitted=False` leaves classes_ unset, so its first partial_fit takes the classes."""
        if theta.size != self.n_params:
            raise ValueError(f"theta has {theta.size} values; {self.estimator} on {self.n_features} features "
                             f"has {self.n_params}")
        est = getattr(linear_model, self.estimator)(**{**self.params, "random_state": random_state})
        coef = np.array(theta[:self._rows * self.n_features].reshape(self._rows, self.n_features))
        est.coef_ = coef if self.is_classifier else coef[0]
        est.intercept_ = np.array(theta[self._rows * self.n_features:])
        if fitted:
            est.n_features_in_ = self.n_features
            if self.is_classifier:
                est.classes_ = np.arange(self.n_classes)
        return est

    def _vector(self, est: Any, dtype: np.dtype) -> np.ndarray:
        return np.concatenate([np.ravel(est.coef_), np.ravel(est.intercept_)]).astype(dtype, copy=False)
