"""Optimizers against the update rules written out here (Keras's formulation of Adam)."""
from __future__ import annotations

import numpy as np

from udfs.core.optimizers import Optimizer


def _grads(n_steps, size, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=size) for _ in range(n_steps)]


def test_sgd():
    opt = Optimizer("sgd", lr=0.1)
    theta = np.ones(4)
    state = opt.init_state(theta)
    for t, g in enumerate(_grads(3, 4), 1):
        expected = theta - 0.1 * g
        opt.step(theta, g, state, t)
        np.testing.assert_allclose(theta, expected)


def test_momentum():
    opt = Optimizer("momentum", lr=0.05, momentum=0.8)
    theta, ref, vel = np.ones(4), np.ones(4), np.zeros(4)
    state = opt.init_state(theta)
    for t, g in enumerate(_grads(5, 4), 1):
        vel = 0.8 * vel - 0.05 * g
        ref = ref + vel
        opt.step(theta, g, state, t)
    np.testing.assert_allclose(theta, ref, rtol=1e-12)


def test_adam_matches_keras_formula():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    opt = Optimizer("adam", lr=lr, beta1=b1, beta2=b2, eps=eps)
    theta, ref = np.zeros(6), np.zeros(6)
    m, v = np.zeros(6), np.zeros(6)
    state = opt.init_state(theta)
    for t, g in enumerate(_grads(20, 6), 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        ref = ref - alpha * m / (np.sqrt(v) + eps)
        opt.step(theta, g, state, t)
    np.testing.assert_allclose(theta, ref, rtol=1e-12)
    np.testing.assert_allclose(state["m"], m, rtol=1e-12)


def test_adam_float32_flushes_subnormal_moments():
    opt = Optimizer("adam", lr=0.001)
    theta = np.zeros(3, dtype=np.float32)
    state = opt.init_state(theta)
    opt.step(theta, np.array([1.0, 0.0, 0.0], dtype=np.float32), state, 1)
    for t in range(2, 2000):
        opt.step(theta, np.zeros(3, dtype=np.float32), state, t)
    tiny = np.finfo(np.float32).tiny
    for buf in state.values():
        assert buf.dtype == np.float32
        assert not ((buf != 0) & (np.abs(buf) < tiny)).any()
