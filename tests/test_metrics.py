"""Confusion matrix and segmentation metrics against closed forms and plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pne_jax.metrics import (
    Confusion,
    accumulate,
    confusion_matrix,
    outside_count,
    segmentation_metrics,
    to_counts,
)


def test_confusion_matrix_matches_numpy_counting():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(3, 17, 19))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 5, size=label.shape)
    want = np.zeros((5, 5), np.int64)
    for y, p in zip(label.ravel(), pred.ravel(), strict=True):
        if y != 255:
            want[y, p] += 1
    got = jax.jit(confusion_matrix, static_argnums=2)(pred, label, 5)
    np.testing.assert_array_equal(got, want)


def test_closed_form_metrics_and_absent_classes():
    # Labels [0, 0, 1, 1], predictions [0, 1, 1, 2]; class 3 appears nowhere.
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 2])
    m = segmentation_metrics(np.asarray(confusion_matrix(pred, label, 4)))
    # IoU: class 0: 1 / (2 + 1 - 1) = 1/2; class 1: 1 / (2 + 2 - 1) = 1/3; class 2: 0 / 1;
    # class 3: no union -> NaN, left out of the mean.
    np.testing.assert_allclose(m["iou"][:3], [1 / 2, 1 / 3, 0.0])
    assert np.isnan(m["iou"][3])
    np.testing.assert_allclose(m["miou"], (1 / 2 + 1 / 3 + 0) / 3)
    np.testing.assert_allclose(m["aacc"], 2 / 4)
    # Accuracy per class: 1/2, 1/2, NaN (no label 2), NaN.
    np.testing.assert_allclose(m["macc"], 0.5)
    np.testing.assert_allclose(m["fwiou"], 0.5 * 1 / 2 + 0.5 * 1 / 3)


def test_accumulation_is_exact_beyond_two_to_the_32():
    total = Confusion.zeros(2)
    step = jnp.array([[2**31 - 1, 5], [0, 7]], jnp.int32)
    add = jax.jit(accumulate)
    for _ in range(5):  # 5 * (2**31 - 1) > 2**32
        total = add(total, step)
    np.testing.assert_array_equal(to_counts(total), 5 * np.array([[2**31 - 1, 5], [0, 7]], float))


def test_sharded_confusion_sums_every_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(8, 6, 6))
    pred = rng.integers(0, 3, size=(8, 6, 6))
    got = jax.jit(confusion_matrix, static_argnums=2)(
        jax.device_put(pred, shard), jax.device_put(label, shard), 3
    )
    np.testing.assert_array_equal(got, confusion_matrix(pred, label, 3))


def test_class_names_and_bad_shapes():
    m = segmentation_metrics(np.eye(2) * 3, class_names=["road", "car"])
    assert m["iou/road"] == 1.0 and m["iou/car"] == 1.0
    with pytest.raises(ValueError, match=r"square \[C, C\] matrix, got shape \(2, 3\)"):
        segmentation_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)


def test_outside_count_accumulates_exactly_and_zeros_take_a_sharding():
    total = Confusion.zeros(2)
    add = jax.jit(accumulate)
    for _ in range(3):  # 3 * (2**31 - 1) > 2**32
        total = add(total, jnp.zeros((2, 2), jnp.int32), jnp.int32(2**31 - 1))
    assert outside_count(total) == 3 * (2**31 - 1)
    assert outside_count(accumulate(Confusion.zeros(2), jnp.zeros((2, 2), jnp.int32))) == 0
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = Confusion.zeros(3, replicated)
    assert all(x.sharding == replicated and x.committed for x in placed)
