"""Pixel-wise cross-entropy with an ignore label, averaged as MMSegmentation 0.13 does.

MMSegmentation before 0.23 averages the per-pixel losses over *all* pixels, ignored ones
included (they contribute 0); `avg_non_ignore=True` arrived later. The paper's runs use
the old behaviour, so it is the default here (`average_over_valid=False`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    total = jnp.sum(jnp.where(valid, losses, 0.0))
    count = jnp.sum(valid) if average_over_valid else valid.size
    return total / jnp.maximum(count, 1).astype(jnp.float32)
