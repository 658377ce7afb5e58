"""Schedules and optimizers against MMCV's formulas and PyTorch's update rules (NumPy)."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from pne_jax.optim import build_optimizer, learning_rate_schedule, weight_decay_mask


def _config(**optimizer):
    base = dict(
        name="sgd",
        learning_rate=0.01,
        momentum=0.9,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=5e-4,
        no_weight_decay=(),
        schedule="poly",
        power=0.9,
        min_learning_rate=1e-4,
        warmup_steps=0,
        warmup_ratio=1e-6,
        grad_clip_norm=0.0,
    )
    base.update(optimizer)
    return ml_collections.ConfigDict({"optimizer": base, "train": {"steps": 100}})


def test_poly_schedule_is_mmcv_formula():
    schedule = learning_rate_schedule(_config(), 100)
    for t in (0, 1, 37, 99, 100, 150):
        want = (0.01 - 1e-4) * (1 - min(t, 100) / 100) ** 0.9 + 1e-4
        np.testing.assert_allclose(schedule(t), want, rtol=1e-6)


def test_linear_warmup_scales_the_regular_rate():
    config = _config(name="adamw", learning_rate=6e-5, power=1.0, min_learning_rate=0.0)
    config.optimizer.warmup_steps = 10
    schedule = learning_rate_schedule(config, 100)
    for t in (0, 5, 10, 50):
        regular = 6e-5 * (1 - t / 100)
        k = (1 - min(t, 10) / 10) * (1 - 1e-6)
        np.testing.assert_allclose(schedule(t), regular * (1 - k), rtol=1e-5)
    assert float(schedule(0)) == pytest.approx(6e-5 * 1e-6, rel=1e-4)


def _run(config, params, grads):
    tx, schedule = build_optimizer(config, params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, schedule


def test_sgd_is_pytorch_sgd_with_l2_weight_decay():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=3).astype(np.float32)}
    grads = [{"w": rng.normal(size=3).astype(np.float32)} for _ in range(4)]
    got, schedule = _run(_config(), params, grads)
    p, buf = params["w"].astype(np.float64), np.zeros(3)
    for t, g in enumerate(grads):
        d = g["w"] + 5e-4 * p
        buf = 0.9 * buf + d
        p = p - float(schedule(t)) * buf
    np.testing.assert_allclose(got["w"], p, rtol=1e-5)


def test_adamw_is_pytorch_adamw_and_skips_no_decay_keys():
    config = _config(name="adamw", learning_rate=1e-3, weight_decay=0.01, schedule="constant")
    config.optimizer.no_weight_decay = ("norm", "relative_position_bias_table")
    rng = np.random.default_rng(1)
    params = {
        "blocks_0": {
            "norm1": {"scale": np.ones(2, np.float32)},
            "fc": {"kernel": np.ones(2, np.float32)},
        },
        "relative_position_bias_table": np.ones(2, np.float32),
    }
    grads = [
        jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        for _ in range(3)
    ]
    got, _ = _run(config, params, grads)

    def adamw(p, gs, decay):
        m = v = np.zeros_like(p, np.float64)
        p = p.astype(np.float64)
        for t, g in enumerate(gs, start=1):
            p = p * (1 - 1e-3 * decay)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - 1e-3 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return p

    kernel = [g["blocks_0"]["fc"]["kernel"] for g in grads]
    scale = [g["blocks_0"]["norm1"]["scale"] for g in grads]
    np.testing.assert_allclose(
        got["blocks_0"]["fc"]["kernel"], adamw(np.ones(2), kernel, 0.01), rtol=1e-5
    )
    np.testing.assert_allclose(
        got["blocks_0"]["norm1"]["scale"], adamw(np.ones(2), scale, 0.0), rtol=1e-5
    )
    mask = weight_decay_mask(params, ("norm", "relative_position_bias_table"))
    assert mask == {
        "blocks_0": {"norm1": {"scale": False}, "fc": {"kernel": True}},
        "relative_position_bias_table": False,
    }


def test_gradient_clipping_and_bad_names():
    config = _config(schedule="constant", weight_decay=0.0, momentum=0.0)
    config.optimizer.grad_clip_norm = 1.0
    got, _ = _run(config, {"w": np.zeros(2, np.float32)}, [{"w": np.array([3.0, 4.0], np.float32)}])
    np.testing.assert_allclose(got["w"], -0.01 * np.array([0.6, 0.8]), rtol=1e-6)
    with pytest.raises(ValueError, match="optimizer.name must be 'sgd' or 'adamw', got 'lamb'"):
        build_optimizer(_config(name="lamb"), {"w": np.zeros(1)})
    with pytest.raises(ValueError, match="optimizer.schedule must be 'poly' or 'constant'"):
        learning_rate_schedule(_config(schedule="cosine"), 10)
