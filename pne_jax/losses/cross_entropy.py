"""Pixel-wise cross-entropy with an ignore label, averaged as MMSegmentation 0.13 does.

MMSegmentation before 0.23 averages the per-pixel losses over *all* pixels, ignored ones
included (they contribute 0); `avg_non_ignore=True` arrived later. The paper's runs use
the old behaviour, so it is the default here (`average_over_valid=False`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    average_over_valid: bool = False,
) -> jax.Array:
    """Mean cross-entropy of logits [..., C] against int labels [...] (float32 scalar).

    Pixels labelled `ignore_index` contribute 0. The mean divides by the number of
    pixels (MMSegmentation 0.13) or, with `average_over_valid`, by the non-ignored ones
    (0 when there are none).
    """
    if jnp.shape(logits)[:-1] != jnp.shape(labels):
        raise ValueError(
            f"logits {jnp.shape(logits)} and labels {jnp.shape(labels)} must agree on all but "
            "the last (class) dimension; resize the logits to the labels first"
        )
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return _mean(jnp.sum(jnp.where(valid, losses, 0.0)), valid, average_over_valid)


def _mean(total: jax.Array, valid: jax.Array, average_over_valid: bool) -> jax.Array:
    """`total` over all pixels, or over the valid ones (0 when there are none)."""
    count = jnp.sum(valid) if average_over_valid else valid.size
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def upsample_factor(logits_shape, labels_shape) -> int | None:
    """The integer factor s with labels [B, s h, s w] for logits [B, h, w, C], or None."""
    (b, h, w), (lb, lh, lw) = tuple(logits_shape[:3]), tuple(labels_shape)
    if b != lb or lh % h or lw % w or lh // h != lw // w:
        return None
    return lh // h


def _phase_taps(scale: int) -> np.ndarray:
    """[scale, 3] weights of input rows k-1, k, k+1 for output row scale*k + r.

    Bilinear with half-pixel centres (PyTorch's `align_corners=False`): output row i
    samples input position (i + 0.5) / scale - 0.5 = k + offset_r, offset_r in (-1/2, 1/2);
    edge rows repeat (PyTorch clamps the position to [0, h - 1]).
    """
    offsets = (np.arange(scale) + 0.5) / scale - 0.5
    return np.stack([np.maximum(-offsets, 0), 1 - np.abs(offsets), np.maximum(offsets, 0)], 1)


def _upsample_phases(x: jax.Array, scale: int) -> jax.Array:
    """[B, h, w, C] -> [B, h, s, w, s, C]: bilinear upsampling by s with output pixel
    (s k + r, s l + q) at [:, k, r, l, q]. Three taps per axis, elementwise (XLA fuses it
    into its consumer, so the upsampled map need not be written out)."""
    taps = jnp.asarray(_phase_taps(scale), x.dtype)  # [s, 3]
    rows = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    h = x.shape[1]
    # [B, h, 1, w, C] x [s] -> [B, h, s, w, C]
    y = sum(rows[:, a : a + h, None] * taps[:, a][None, None, :, None, None] for a in range(3))
    cols = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    w = x.shape[2]
    return sum(
        cols[:, :, :, b : b + w, None] * taps[:, b][None, None, None, None, :, None]
        for b in range(3)
    )


def upsampled_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    average_over_valid: bool = False,
) -> jax.Array:
    """`cross_entropy(resize(logits, labels.shape[1:]), labels)` fused, for labels an integer
    multiple s of the logits' size: logits [B, h, w, C], labels [B, s h, s w].

    The same bilinear upsampling (half-pixel centres, as PyTorch's `align_corners=False`),
    written as three taps per axis in a phase layout ([B, h, s, w, s, C], labels reshaped
    to match: the mean does not care about pixel order), so that the upsampling, the
    log-softmax and the label pick fuse into one pass instead of materialising the
    upsampled logits and their softmax at full resolution. Computed in float32.
    """
    scale = upsample_factor(jnp.shape(logits), jnp.shape(labels))
    if scale is None:
        raise ValueError(
            f"labels {jnp.shape(labels)} must be an integer multiple s of the logits' size "
            f"{jnp.shape(logits)[:3]} (the same s on both axes); resize the logits instead"
        )
    b, h, w, _ = logits.shape
    labels = jnp.reshape(labels, (b, h, scale, w, scale))
    valid = labels != ignore_index
    total = _upsampled_ce_sum(logits.astype(jnp.float32), jnp.where(valid, labels, -1), scale)
    return _mean(total, valid, average_over_valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _upsampled_ce_sum(logits: jax.Array, labels: jax.Array, scale: int) -> jax.Array:
    """Sum over pixels with label >= 0 of -log softmax(upsampled logits)[label]; labels in
    the phase layout [B, h, s, w, s], -1 where ignored."""
    return _upsampled_ce_forward(logits, labels, scale)[0]


def _upsampled_ce_forward(logits, labels, scale):
    up = _upsample_phases(logits, scale)  # [B, h, s, w, s, C]
    lse = jax.nn.logsumexp(up, axis=-1)
    picked = jnp.sum(jnp.where(_one_hot(labels, up.shape[-1]), up, 0.0), axis=-1)
    losses = jnp.where(labels >= 0, lse - picked, 0.0)
    # [B, h, s, w, s] is raster order: sum it as [B, H, W], the reference's reduction.
    b, h, s, w, _ = losses.shape
    return jnp.sum(losses.reshape(b, h * s, w * s)), lse


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)


def _upsampled_ce_fwd(logits, labels, scale):
    total, lse = _upsampled_ce_forward(logits, labels, scale)
    return total, (logits, labels, lse)


def _upsampled_ce_bwd(scale, residuals, g):
    # Only the per-pixel log-sum-exp is kept from the forward; the upsampled logits and the
    # softmax are recomputed here, in the fusion that reduces them back to [B, h, w, C].
    logits, labels, lse = residuals
    up, transpose = jax.vjp(lambda x: _upsample_phases(x, scale), logits)
    probs = jnp.exp(up - lse[..., None])
    d_up = jnp.where((labels >= 0)[..., None], probs - _one_hot(labels, up.shape[-1]), 0.0)
    (d_logits,) = transpose(g * d_up)
    return d_logits, None


_upsampled_ce_sum.defvjp(_upsampled_ce_fwd, _upsampled_ce_bwd)
