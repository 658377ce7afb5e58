"""The static-shape pieces of the PNE loss: prediction, sorting, and the capacity bounds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pne_jax import pne_loss
from pne_jax.losses import pne_batch_stats
from pne_jax.losses.pne_layout import image_layout, layout_sizes, predict, stable_order
from tests.pne_reference import pne_reference


def test_predict_matches_argmax_and_log_softmax_max():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(500, 171)), 1).astype(np.float32)  # many exact ties
    logits[0] = 3.0  # all equal: first index
    logits[1] = np.float32(3e38) * np.sign(rng.normal(size=171))  # gaps overflow to inf
    logits[2, 9] = np.nextafter(logits[2].max(), np.float32(np.inf))  # wins by one ulp
    logits[3] = -3e38
    pred, log_conf = jax.jit(predict)(logits)
    np.testing.assert_array_equal(pred, np.argmax(logits, axis=-1))
    # The confidence is max - logsumexp in float32, like the reference's float32 softmax:
    # exact to float32 resolution relative to the logits, so compare the realistic rows.
    x = logits.astype(np.float64)
    want = -np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1))
    realistic = np.abs(x).max(-1) < 1e3
    assert realistic.sum() == 498
    np.testing.assert_allclose(log_conf[realistic], want[realistic], rtol=1e-6, atol=1e-6)


def test_predict_gives_a_valid_class_for_non_finite_logits():
    logits = np.zeros((4, 5), np.float32)
    logits[0] = np.nan
    logits[1, [1, 3]] = np.inf
    logits[2] = -np.inf
    logits[3, 2] = np.nan
    pred, _ = predict(logits)
    assert np.all((np.asarray(pred) >= 0) & (np.asarray(pred) < 5))


@pytest.mark.parametrize("max_key", [5, 2**20])  # packed uint32 sort, and argsort fallback
def test_stable_order_is_a_stable_argsort(max_key):
    rng = np.random.default_rng(max_key % 97)
    key = rng.integers(0, min(max_key, 6) + 1, size=4096).astype(np.int32)
    order = jax.jit(stable_order, static_argnums=1)(key, max_key)
    np.testing.assert_array_equal(order, np.argsort(key, kind="stable"))


def test_layout_sizes_cover_every_anchor_and_respect_caps():
    sizes = layout_sizes(8192, 19, 100, (0, 199), None)
    assert sizes.tile_rows >= 100 and sizes.tile_rows % 8 == 0
    assert sizes.fallback_tiles * sizes.tile_rows >= 8192
    assert sizes.class_tiles >= -(-8192 // sizes.tile_rows) + 19
    assert sizes.class_tiles % sizes.tiles_per_chunk == 0
    # Few classes or a pair cap bound the kept anchors below the pixel count.
    small = layout_sizes(8192, 3, 5, (0, 199), None)  # 6 pairs x 5 anchors
    assert small.fallback_tiles * small.tile_rows < 64
    capped = layout_sizes(8192, 19, 100, (0, 199), 4)  # 4 pairs x 100 anchors
    assert capped.fallback_tiles * capped.tile_rows < 8192 // 8


def _adversarial(fallback: bool):
    """8 classes in 8 rows of 8 pixels: one correct pixel per row, the other 7 pixels each
    a different pair (56 pairs of 1 anchor: every misclassified pixel is an anchor). With
    `fallback`, classes 4-7 are never correct, so pairs they lead use their own anchors."""
    labels = np.repeat(np.arange(8), 8).reshape(1, 8, 8).astype(np.int32)
    pred = (labels + np.arange(8)[None, None, :]) % 8
    if fallback:
        pred[0, 4:, 0] = (np.arange(4, 8) + 1) % 4
    logits = np.eye(8, dtype=np.float32)[pred] * 2 + 0.1
    emb = np.random.default_rng(1).normal(size=(1, 8, 8, 16)).astype(np.float32)
    return logits, labels, emb


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("num_samples", [1, 3, 100])
def test_every_pixel_an_anchor_is_exact(fallback, num_samples):
    logits, labels, emb = _adversarial(fallback)
    stats = pne_batch_stats(logits, labels, emb, num_samples=num_samples)
    want, want_grad, ref = pne_reference(logits, labels, emb, num_samples=num_samples)
    assert int(stats.num_pairs[0]) == ref["num_pairs"] >= 24
    if not fallback:  # all 56 misclassified pixels are anchors, one per pair
        assert int(stats.num_pairs[0]) == int(stats.num_anchors[0]) == ref["num_anchors"] == 56
    value, grad = jax.value_and_grad(
        lambda e: pne_loss(logits, labels, e, num_samples=num_samples)
    )(emb)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())


def test_fallback_pairs_spanning_tile_boundaries():
    # 3 classes on a 1x40 strip; class 2 is never correct, so pairs (2, 0) and (2, 1)
    # fall back to their own anchors, with 6 and 9 anchors: with S = 8 the tiles hold 8
    # rows, so the second pair straddles two tiles.
    labels = np.array([[[0] * 10 + [1] * 15 + [2] * 15]], np.int32)
    pred = labels.copy()
    pred[0, 0, 2:8] = 2  # 6 zeros predicted 2
    pred[0, 0, 12:21] = 2  # 9 ones predicted 2
    pred[0, 0, 25:] = 0  # every 2 predicted 0
    logits = jnp.asarray(np.eye(3, dtype=np.float32)[pred] * 3)
    emb = np.random.default_rng(2).normal(size=(1, 1, 40, 8)).astype(np.float32)
    # With S = 8 (8-row tiles) the fallback rows are pixels 2-7, then 12-19: the second
    # pair fills the last 2 rows of tile 0 and the first 6 of tile 1.
    sizes = layout_sizes(40, 3, 8, (0, 199), None)
    layout = jax.jit(
        functools.partial(
            image_layout,
            num_samples=8,
            gate=(0, 199),
            positive_weighting=True,
            ignore_index=255,
            max_pairs_per_image=None,
            sizes=sizes,
        )
    )(logits.reshape(40, 3), labels.reshape(40))
    fb_rows = np.asarray(layout.fallback.rows)
    assert sizes.tile_rows == 8
    np.testing.assert_array_equal(fb_rows[0], [2, 3, 4, 5, 6, 7, 12, 13])
    np.testing.assert_array_equal(fb_rows[1, :6], [14, 15, 16, 17, 18, 19])
    for s in (8, 5, 16):
        want, want_grad, ref = pne_reference(logits, labels, emb, num_samples=s)
        assert ref["num_pairs"] == 2  # (0, 2) has no positives: class 2 is never correct
        value, grad = jax.value_and_grad(lambda e, s=s: pne_loss(logits, labels, e, num_samples=s))(
            emb
        )
        np.testing.assert_allclose(value, want, rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())
