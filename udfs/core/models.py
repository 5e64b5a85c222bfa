"""Models as a spec plus one flat parameter vector.

Every model here is a stack of dense layers (ReLU between them) with one of three heads, so the four
kinds users name are one implementation:

    softmax  = [d, K]            softmax cross-entropy
    mlp      = [d, h1, ..., K]   softmax cross-entropy, ReLU hidden layers
    logistic = [d, 1]            sigmoid binary cross-entropy (labels 0/1)
    linear   = [d, 1]            mean squared error

X may be a scipy CSR matrix (sparse wide input): the first layer multiplies it without densifying.

Parameters are laid out layer by layer as W (in x out, row-major) then b (out). Keeping them in one
flat vector makes averaging, clipping, noise, masking and checkpoints plain vector operations.

`Model` is the interface every trainer, evaluator and scorer uses: `ModelSpec` (these built-ins)
and the adapters in `udfs/adapters` (a user's PyTorch module) implement it, so nothing outside an
adapter asks which kind of model it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from scipy import sparse

HEADS = {"mlp": "softmax", "softmax": "softmax", "logistic": "sigmoid", "linear": "identity"}
CLASSIFIERS = {"mlp", "softmax", "logistic"}
# trainer.dtype: the float types weights, gradients and blocks are computed in
FLOAT_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float64": np.float64}


class Model(Protocol):
    """A model as the trainers see it: a flat parameter vector and what can be computed from it.

    `head` is `softmax` (class logits), `sigmoid` (one binary logit) or `identity` (a value), and
    fixes how outputs become labels and probabilities (`Outputs`). An implementation must be a small
    picklable value: it travels to the executors inside every task description."""

    @property
    def kind(self) -> str: ...
    @property
    def head(self) -> str: ...
    @property
    def n_features(self) -> int: ...
    @property
    def n_params(self) -> int: ...
    @property
    def is_classifier(self) -> bool: ...
    @property
    def n_classes(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        """What the summary line and spec.json record of the architecture (JSON values)."""
        ...

    def init(self, rng: np.random.Generator, init: str, dtype: npt.DTypeLike) -> np.ndarray:
        """Initial parameters, every draw from `rng`."""
        ...

    def loss_and_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean training loss over the rows of X and its gradient w.r.t. theta (theta's dtype).
        Entries that are not trained (running statistics) get a zero gradient and may be updated
        in theta itself by the training forward pass."""
        ...

    def decision(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Raw outputs for inference: logits, one logit column, or values."""
        ...

    def output_loss(self, out: np.ndarray, y: np.ndarray) -> float:
        """Summed loss of `decision`'s output against labels y (for evaluation)."""
        ...

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Class labels for classifiers, values for regression."""
        ...

    def labels(self, out: np.ndarray) -> np.ndarray:
        """Class labels (or values) from `decision`'s output."""
        ...

    def probabilities(self, out: np.ndarray) -> np.ndarray:
        """Class probabilities from `decision`'s output (classifiers only)."""
        ...

    def files(self, theta: np.ndarray) -> dict[str, bytes]:
        """Files saved beside weights.npz and spec.json in the model directory (a framework's own
        format of the same weights, the source they need)."""
        ...


@runtime_checkable
class LocalFit(Protocol):
    """A model trained by its own fitting routine instead of gradients (scikit-learn's partial_fit
    family): local training calls this where it would take optimizer steps."""

    def local_fit(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, epochs: int,
                  random_state: int) -> tuple[np.ndarray, float]:
        """`epochs` passes over (X, y) from theta, shuffled by `random_state`: the new vector and
        its mean loss on (X, y)."""
        ...


class Outputs(ABC):
    """What follows from the model's head alone, shared by every implementation of `Model`."""

    @property
    @abstractmethod
    def head(self) -> str: ...

    @abstractmethod
    def decision(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray: ...

    def labels(self, out: np.ndarray) -> np.ndarray:
        return labels_from_decision(self, out)

    def probabilities(self, out: np.ndarray) -> np.ndarray:
        return probabilities(self, out)

    def output_loss(self, out: np.ndarray, y: np.ndarray) -> float:
        return head_loss(self, out, y, need_grad=False)[0]

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return labels_from_decision(self, self.decision(theta, X))


@dataclass(frozen=True)
class ModelSpec(Outputs):
    """Architecture of a built-in model: its kind and the width of every layer, input first. It is
    the numpy implementation of `Model`."""

    kind: str
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise ValueError(f"model kind must be one of {sorted(HEADS)}, got {self.kind!r}")
        if len(self.layers) < 2 or any(int(w) < 1 for w in self.layers):
            raise ValueError(f"layers must be >= 2 positive widths, got {self.layers}")
        if self.kind != "mlp" and len(self.layers) != 2:
            raise ValueError(f"a {self.kind} model has no hidden layers, got {self.layers}")
        if self.kind in ("logistic", "linear") and self.layers[-1] != 1:
            raise ValueError(f"a {self.kind} model has one output, got {self.layers[-1]}")

    @classmethod
    def build(cls, kind: str, n_features: int, n_outputs: int, hidden: list[int]) -> ModelSpec:
        """The spec for `kind` on data with `n_features` inputs and `n_outputs` classes (1 for
        regression and binary logistic)."""
        if kind == "mlp":
            return cls(kind, (n_features, *hidden, n_outputs))
        out = 1 if kind in ("logistic", "linear") else n_outputs
        return cls(kind, (n_features, out))

    @property
    def head(self) -> str:
        return HEADS[self.kind]

    @property
    def is_classifier(self) -> bool:
        return self.kind in CLASSIFIERS

    @property
    def n_classes(self) -> int:
        """Number of label values a classifier predicts (2 for logistic); 0 for regression."""
        if not self.is_classifier:
            return 0
        return 2 if self.kind == "logistic" else self.layers[-1]

    @property
    def n_params(self) -> int:
        return sum(a * b + b for a, b in zip(self.layers[:-1], self.layers[1:], strict=False))

    @property
    def n_features(self) -> int:
        return self.layers[0]

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(str(data["kind"]), tuple(int(w) for w in data["layers"]))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers)}

    def init(self, rng: np.random.Generator, init: str, dtype: npt.DTypeLike) -> np.ndarray:
        return init_params(self, rng, init, dtype)

    def loss_and_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return loss_and_grad(self, theta, X, y)

    def decision(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return decision(self, theta, X)

    def files(self, theta: np.ndarray) -> dict[str, bytes]:
        return {}


def unpack(spec: ModelSpec, theta: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (W, b) views of `theta` for each layer; writing to them writes to `theta`."""
    offset = 0
    for fan_in, fan_out in zip(spec.layers[:-1], spec.layers[1:], strict=False):
        w = theta[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += fan_in * fan_out
        b = theta[offset:offset + fan_out]
        offset += fan_out
        yield w, b


def skip(gen: np.random.Generator, values: int) -> None:
    """Move `gen` past `values` weight draws: every initialiser draws a matrix row-major, one
    64-bit output per value (Generator.uniform in float64), so a part of a model drawn on its own
    (a model-parallel feature block, the head) gets the values the whole model would."""
    if values:
        bit_generator = gen.bit_generator
        if not isinstance(bit_generator, (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox)):
            raise TypeError(f"{type(bit_generator).__name__} cannot skip draws (advance): "
                            "use a PCG64 generator (np.random.default_rng)")
        bit_generator.advance(values)


def glorot_uniform(gen: np.random.Generator, fan_in: int, fan_out: int, lo: int = 0,
                   hi: int | None = None) -> np.ndarray:
    """Rows lo..hi (default: all) of a fan_in x fan_out Glorot-uniform matrix (Keras's default)
    whose draws start at `gen`'s position, in float64; `gen` ends after row hi."""
    skip(gen, lo * fan_out)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return gen.uniform(-limit, limit, size=((fan_in if hi is None else hi) - lo, fan_out))


def zeros(gen: np.random.Generator, fan_in: int, fan_out: int, lo: int = 0,
          hi: int | None = None) -> np.ndarray:
    """Rows lo..hi of an all-zero matrix; draws nothing."""
    return np.zeros(((fan_in if hi is None else hi) - lo, fan_out))


# model.init: how a weight matrix (rows lo..hi of fan_in x fan_out) is drawn; biases start at zero
INITIALISERS: dict[str, Callable[..., np.ndarray]] = {"glorot_uniform": glorot_uniform, "zeros": zeros}


def initialiser(init: str) -> Callable[..., np.ndarray]:
    if init not in INITIALISERS:
        raise ValueError(f"init must be one of {sorted(INITIALISERS)}, got {init!r}")
    return INITIALISERS[init]


def init_params(spec: ModelSpec, rng: np.random.Generator, init: str = "glorot_uniform",
                dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Weights drawn by the `init` initialiser layer by layer from `rng`, and zero biases."""
    draw = initialiser(init)
    theta = np.zeros(spec.n_params, dtype=dtype)
    for w, _ in unpack(spec, theta):
        w[...] = draw(rng, *w.shape)
    return theta


def _forward(spec: ModelSpec, theta: np.ndarray, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Return the input of every layer and the output logits."""
    layers = list(unpack(spec, theta))
    inputs = [X]
    h = X
    for i, (w, b) in enumerate(layers):
        z = np.asarray(h @ w)
        z += b
        if i < len(layers) - 1:
            np.maximum(z, 0, out=z)
            inputs.append(z)
        h = z
    return inputs, h


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def head_loss(spec: Outputs, out: np.ndarray, y: np.ndarray,
              need_grad: bool = True) -> tuple[float, np.ndarray | None]:
    """Summed loss of the model output `out` against labels `y`, and its gradient w.r.t. `out`."""
    n = out.shape[0]
    if spec.head == "softmax":
        logp = _log_softmax(out)
        labels = y.astype(np.int64, copy=False)
        loss = -float(logp[np.arange(n), labels].sum())
        if not need_grad:
            return loss, None
        delta = np.exp(logp)
        delta[np.arange(n), labels] -= 1.0
    elif spec.head == "sigmoid":
        z = out[:, 0]
        t = y.astype(out.dtype, copy=False)
        # log(1 + e^z) - t z, computed without overflow for large |z|
        loss = float((np.logaddexp(0.0, z) - t * z).sum())
        delta = (1.0 / (1.0 + np.exp(-z)) - t)[:, None] if need_grad else None
    else:
        resid = out[:, 0] - y.astype(out.dtype, copy=False)
        loss = float(resid @ resid)
        delta = (2.0 * resid)[:, None] if need_grad else None
    return loss, delta


def backward(spec: ModelSpec, out: np.ndarray, y: np.ndarray, dtype: np.dtype,
             weights: list[np.ndarray], grads: list[tuple[np.ndarray, np.ndarray]],
             inputs: list[np.ndarray], through_first: bool = False) -> tuple[float, np.ndarray | None]:
    """The backward pass of dense layers with ReLU between them: `out` is the last layer's output,
    inputs[i] the input of layer i (weights[i]); each layer's (W, b) gradient of the mean loss
    against `y` is written into grads[i]. Returns the mean loss and, when `through_first`, the
    gradient with respect to the pre-activation whose ReLU gave inputs[0] (a model-parallel head:
    the summed first-layer partials), else None (inputs[0] is the data)."""
    n = out.shape[0]
    loss, delta = head_loss(spec, out, y)
    assert delta is not None   # head_loss returns the gradient when need_grad (the default)
    delta = delta.astype(dtype, copy=False) / n
    for i in range(len(weights) - 1, -1, -1):
        gw, gb = grads[i]
        if sparse.issparse(inputs[i]):   # a sparse input row block: the gradient stays dense, X does too
            gw[...] = inputs[i].T @ delta
        else:
            np.matmul(inputs[i].T, delta, out=gw)
        gb[...] = delta.sum(axis=0)
        if i or through_first:
            delta = delta @ weights[i].T
            delta *= inputs[i] > 0
    return loss / n, delta if through_first else None


def loss_and_grad(spec: ModelSpec, theta: np.ndarray, X: np.ndarray,
                  y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss over the rows of X and its gradient with respect to theta (same dtype as theta)."""
    inputs, out = _forward(spec, theta, X)
    grad = np.empty_like(theta)
    loss, _ = backward(spec, out, y, theta.dtype, [w for w, _ in unpack(spec, theta)],
                       list(unpack(spec, grad)), inputs)
    return loss, grad


def decision(spec: ModelSpec, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Raw model output: logits (softmax), one logit column (logistic) or the prediction (linear)."""
    return _forward(spec, theta, X)[1]


def predict_proba(spec: ModelSpec, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Class probabilities, one column per class (two for logistic)."""
    return probabilities(spec, decision(spec, theta, X))


def probabilities(spec: Outputs, out: np.ndarray) -> np.ndarray:
    """Class probabilities from `decision`'s output: scoring needs labels and probabilities of the
    same rows, and the forward pass is most of the cost, so it runs once for both."""
    if spec.head == "softmax":
        return np.exp(_log_softmax(out))
    if spec.head == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-out[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    raise ValueError("a linear model predicts values, not probabilities")


def labels_from_decision(spec: Outputs, out: np.ndarray) -> np.ndarray:
    """Class labels for classifiers, values for regression, from `decision`'s output."""
    if spec.head == "softmax":
        return out.argmax(axis=1)
    if spec.head == "sigmoid":
        return (out[:, 0] > 0).astype(np.int64)
    return out[:, 0]


def predict(spec: ModelSpec, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Class labels for classifiers, values for regression."""
    return labels_from_decision(spec, decision(spec, theta, X))
