"""Models: gradients against central finite differences, shapes, initialisation."""
from __future__ import annotations

import numpy as np
import pytest

from udfs.core.models import ModelSpec, init_params, loss_and_grad, predict, predict_proba, unpack


def _numeric_grad(spec, theta, X, y, eps=1e-6):
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        step = np.zeros_like(theta)
        step[i] = eps
        grad[i] = (loss_and_grad(spec, theta + step, X, y)[0]
                   - loss_and_grad(spec, theta - step, X, y)[0]) / (2 * eps)
    return grad


@pytest.mark.parametrize("kind,layers,label", [
    ("softmax", (5, 3), "class"),
    ("mlp", (5, 4, 3), "class"),
    ("mlp", (5, 4, 6, 3), "class"),
    ("logistic", (5, 1), "binary"),
    ("linear", (5, 1), "real"),
])
def test_gradient_matches_finite_differences(kind, layers, label):
    rng = np.random.default_rng(7)
    spec = ModelSpec(kind, layers)
    X = rng.normal(size=(11, layers[0]))
    y = {"class": rng.integers(0, layers[-1], 11), "binary": rng.integers(0, 2, 11),
         "real": rng.normal(size=11)}[label]
    # random biases too, so no ReLU sits exactly at its kink
    theta = rng.normal(scale=0.5, size=spec.n_params)
    loss, grad = loss_and_grad(spec, theta, X, y)
    assert np.isfinite(loss)
    np.testing.assert_allclose(grad, _numeric_grad(spec, theta, X, y), rtol=1e-5, atol=1e-7)


def test_softmax_loss_is_cross_entropy_written_out():
    rng = np.random.default_rng(0)
    spec = ModelSpec("softmax", (4, 3))
    theta = rng.normal(size=spec.n_params)
    X, y = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    W, b = theta[:12].reshape(4, 3), theta[12:]
    logits = X @ W + b
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(6), y]))
    assert loss_and_grad(spec, theta, X, y)[0] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(predict_proba(spec, theta, X), p, rtol=1e-12)
    np.testing.assert_array_equal(predict(spec, theta, X), p.argmax(axis=1))


def test_parameter_layout_and_count():
    spec = ModelSpec("mlp", (784, 128, 10))
    assert spec.n_params == 784 * 128 + 128 + 128 * 10 + 10
    theta = np.arange(spec.n_params, dtype=np.float64)
    (w1, b1), (w2, b2) = unpack(spec, theta)
    assert w1.shape == (784, 128) and b1[0] == 784 * 128 and w2.shape == (128, 10)
    assert b2[-1] == spec.n_params - 1


def test_glorot_uniform_bounds_and_zero_biases():
    spec = ModelSpec("mlp", (30, 20, 5))
    theta = init_params(spec, np.random.default_rng(1), "glorot_uniform", np.float32)
    assert theta.dtype == np.float32
    (w1, b1), (w2, b2) = unpack(spec, theta)
    assert np.abs(w1).max() <= np.sqrt(6 / 50) and np.abs(w1).max() > 0.8 * np.sqrt(6 / 50)
    assert not b1.any() and not b2.any()


def test_float32_stays_float32():
    spec = ModelSpec("mlp", (8, 4, 3))
    theta = init_params(spec, np.random.default_rng(0), dtype=np.float32)
    X = np.random.default_rng(1).random((5, 8), dtype=np.float32)
    _, grad = loss_and_grad(spec, theta, X, np.array([0, 1, 2, 1, 0]))
    assert grad.dtype == np.float32


@pytest.mark.parametrize("kind,layers", [("logistic", (3, 2)), ("softmax", (3, 4, 2)),
                                         ("linear", (3, 1, 1))])
def test_spec_rejects_impossible_shapes(kind, layers):
    with pytest.raises(ValueError):
        ModelSpec(kind, layers)
