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


def _numpy_bilinear(x, size):
    """PyTorch's bilinear `align_corners=False` upsampling in float64, from its definition:
    output i samples max((i + 0.5) * in / out - 0.5, 0), interpolating its two neighbours."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - (src - lo)
        m[np.arange(n_out), hi] += src - lo
        return m

    rows, cols = axis_weights(x.shape[1], size[0]), axis_weights(x.shape[2], size[1])
    return np.einsum("Hh,bhwc,Ww->bHWc", rows, x.astype(np.float64), cols)


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("over_valid", [False, True])
def test_fused_upsampled_ce_equals_resize_then_ce(scale, over_valid):
    """The fused loss equals the unfused reference (resize, then cross_entropy) in value and
    gradient, and both equal a float64 NumPy upsampling + CE."""
    import jax

    from pne_jax.losses.cross_entropy import upsampled_cross_entropy
    from pne_jax.models.layers import resize

    rng = np.random.default_rng(scale)
    logits = (rng.normal(size=(2, 3, 5, 7)) * 3).astype(np.float32)
    size = (3 * scale, 5 * scale)
    labels = rng.integers(0, 7, size=(2, *size))
    labels[rng.random(labels.shape) < 0.2] = 255
    kwargs = dict(average_over_valid=over_valid)

    def reference(x):
        return cross_entropy(resize(x, size), labels, **kwargs)

    def fused(x):
        return upsampled_cross_entropy(x, labels, **kwargs)

    expected = _numpy_ce(_numpy_bilinear(logits, size), labels, 255, over_valid)
    np.testing.assert_allclose(fused(logits), expected, rtol=1e-5)  # float32 sums
    np.testing.assert_allclose(fused(logits), reference(logits), rtol=2e-6)
    np.testing.assert_allclose(
        jax.grad(fused)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-8
    )


def test_fused_upsampled_ce_all_ignored_and_jit():
    import jax

    from pne_jax.losses.cross_entropy import upsampled_cross_entropy

    logits = np.ones((1, 2, 2, 3), np.float32)
    labels = np.full((1, 8, 8), 255)
    value = jax.jit(lambda x: upsampled_cross_entropy(x, labels, average_over_valid=True))
    assert float(value(logits)) == 0.0
    grad = jax.grad(lambda x: upsampled_cross_entropy(x, labels))(logits)
    np.testing.assert_array_equal(grad, 0.0)


def test_fused_upsampled_ce_needs_an_integer_factor():
    from pne_jax.losses.cross_entropy import upsampled_cross_entropy

    with pytest.raises(ValueError, match=r"integer multiple s of the logits' size \(1, 4, 4\)"):
        upsampled_cross_entropy(np.zeros((1, 4, 4, 3)), np.zeros((1, 8, 12), int))
