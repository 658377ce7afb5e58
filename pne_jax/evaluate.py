"""Evaluation: predictions at each label's original resolution, and mIoU over a split.

'whole' inference as MMSegmentation does it: the image, resized to the test scale (ratio
kept) and padded, goes through the model; the logits are upsampled bilinearly to the
padded input, cropped to the image's valid region and resized to the label's original
size before the argmax. Crop and resize differ per image; to keep shapes static, each
example's logits are edge-replicated beyond its valid region (which equals PyTorch's
clamping at the border) and resampled with a per-example scale. Padding never enters the
metric: padded label pixels are 255 and filler examples are masked out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pne_jax import metrics
from pne_jax.models.layers import resize


def _crop_resize(logits: jax.Array, valid: jax.Array, size: jax.Array, out_shape) -> jax.Array:
    """One example: logits [H, W, C] whose top-left `valid` (h, w) region is the image ->
    that region resized bilinearly (half-pixel centres) to `size` (h', w'), placed at the
    top left of an [*out_shape, C] array (the rest is filler)."""
    rows = jnp.minimum(jnp.arange(logits.shape[0]), valid[0] - 1)
    cols = jnp.minimum(jnp.arange(logits.shape[1]), valid[1] - 1)
    clamped = logits[rows][:, cols]
    scale = size.astype(jnp.float32) / jnp.maximum(valid, 1).astype(jnp.float32)
    return jax.image.scale_and_translate(
        clamped,
        (*out_shape, logits.shape[-1]),
        (0, 1),
        scale,
        jnp.zeros(2, jnp.float32),
        method="linear",
        antialias=False,
    )


def predict_whole(
    model: nn.Module, variables: Any, batch: Mapping[str, jax.Array], label_shape: tuple[int, int]
) -> jax.Array:
    """int32 predictions [b, *label_shape] for an evaluation batch (input_pipeline format)."""
    outputs = model.apply(variables, batch["image"], train=False)
    logits = resize(outputs["logits"].astype(jnp.float32), batch["image"].shape[1:3])
    logits = jax.vmap(functools.partial(_crop_resize, out_shape=label_shape))(
        logits, batch["image_size"], batch["label_size"]
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_confusion_step(
    model: nn.Module, num_classes: int, ignore_index: int = 255
) -> Callable[..., metrics.Confusion]:
    """Jitted (variables, batch, confusion) -> confusion + this batch's counts."""

    @jax.jit
    def step(variables, batch, total: metrics.Confusion) -> metrics.Confusion:
        label = batch["label"]
        pred = predict_whole(model, variables, batch, label.shape[1:3])
        label = jnp.where(batch["mask"][:, None, None], label, ignore_index)
        batch_counts = metrics.confusion_matrix(pred, label, num_classes, ignore_index)
        return metrics.accumulate(total, batch_counts)

    return step


def evaluate(
    model: nn.Module,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int,
    *,
    place: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
    class_names: list[str] | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Metrics (`metrics.segmentation_metrics`) over host batches, each placed by `place`
    (e.g. `input_pipeline.to_global_array`). The confusion matrix stays on device."""
    step = make_confusion_step(model, num_classes, ignore_index)
    total = metrics.Confusion.zeros(num_classes)
    for batch in batches:
        total = step(variables, place(batch), total)
    return metrics.segmentation_metrics(total, class_names)
