"""Cross-entropy with ignore label, against a float64 NumPy computation."""

import numpy as np
import pytest

from pne_jax.losses.cross_entropy import cross_entropy


def _numpy_ce(logits, labels, ignore, over_valid):
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = labels != ignore
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    total = -(picked * valid).sum()
    return total / (valid.sum() if over_valid else labels.size)


@pytest.mark.parametrize("over_valid", [False, True])
def test_matches_numpy_with_ignored_pixels(over_valid):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=(2, 5, 7))
    labels[rng.random(labels.shape) < 0.3] = 255
    got = cross_entropy(logits, labels, average_over_valid=over_valid)
    np.testing.assert_allclose(got, _numpy_ce(logits, labels, 255, over_valid), rtol=1e-6)


def test_mmseg_013_averages_over_all_pixels():
    # Two pixels, one ignored: uniform logits over 4 classes give log(4) on the valid one;
    # MMSegmentation 0.13 divides by both pixels.
    logits = np.zeros((1, 2, 4), np.float32)
    labels = np.array([[1, 255]])
    np.testing.assert_allclose(cross_entropy(logits, labels), np.log(4) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        cross_entropy(logits, labels, average_over_valid=True), np.log(4), rtol=1e-6
    )
    all_ignored = np.full((1, 2), 255)
    assert float(cross_entropy(logits, all_ignored, average_over_valid=True)) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"logits \(1, 4, 4, 3\) and labels \(1, 8, 8\)"):
        cross_entropy(np.zeros((1, 4, 4, 3)), np.zeros((1, 8, 8), int))
