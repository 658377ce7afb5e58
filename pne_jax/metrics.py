"""Segmentation metrics: a jittable confusion matrix and the numbers MMSegmentation reports.

The confusion matrix is accumulated on device over a whole split. Cityscapes validation
alone has 1e9 pixels, more than int32 can count safely, so `accumulate` keeps each cell
as two uint32 words (value = high * 2**32 + low) and carries exactly; `to_counts` turns
them into float64 on the host, where `segmentation_metrics` computes mIoU, per-class IoU,
aAcc, mAcc and frequency-weighted IoU. A class absent from both the predictions and the
labels has no union: its IoU is NaN and it is left out of the means, as in MMSegmentation.

Labels that are neither `ignore_index` nor a class in [0, C) are not counted in the matrix;
`count_outside` counts them, and `Confusion` carries that count (exactly, as the cells), so
an evaluation can report a dataset whose labels do not match the model's classes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pne_jax.augment import IGNORE_INDEX


def confusion_matrix(
    pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """[C, C] int32 counts, rows = label, columns = prediction, over all non-ignored pixels.

    `pred` and `label` are int arrays of the same shape (any batch layout, sharded or not;
    the sum covers every device). Labels outside [0, C) other than `ignore_index`, negative
    ones included, are not counted (`count_outside` counts them). One call must cover fewer
    than 2**31 pixels; accumulate across calls.
    """
    if jnp.shape(pred) != jnp.shape(label):
        raise ValueError(f"pred {jnp.shape(pred)} and label {jnp.shape(label)} differ in shape")
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = jnp.where(valid, label * num_classes + pred, num_classes * num_classes)
    counts = jnp.bincount(index.ravel(), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def count_outside(
    label: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """int32 scalar: pixels whose label is neither `ignore_index` nor in [0, C) (jittable)."""
    outside = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    return jnp.sum(outside, dtype=jnp.int32)


class Confusion(NamedTuple):
    """A confusion matrix accumulated exactly beyond 2**32: high * 2**32 + low (uint32), and
    likewise the count of labels outside [0, C) that are not ignored (`outside_count`)."""

    low: jax.Array
    high: jax.Array
    outside_low: jax.Array
    outside_high: jax.Array

    @classmethod
    def zeros(cls, num_classes: int, sharding: jax.sharding.Sharding | None = None) -> Confusion:
        """An empty total; with `sharding` (e.g. replicated over the evaluation mesh) its
        arrays are committed there, as the totals a jitted step returns."""
        z, s = jnp.zeros((num_classes, num_classes), jnp.uint32), jnp.zeros((), jnp.uint32)
        total = cls(z, z, s, s)
        return total if sharding is None else jax.device_put(total, sharding)


def _add_exact(low: jax.Array, high: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    new = low + x.astype(jnp.uint32)  # wraps modulo 2**32
    return new, high + (new < low).astype(jnp.uint32)


def accumulate(total: Confusion, batch: jax.Array, outside: jax.Array | int = 0) -> Confusion:
    """Adds a batch's int32 confusion matrix and its `count_outside` (jittable, exact)."""
    low, high = _add_exact(total.low, total.high, batch)
    outside_low, outside_high = _add_exact(
        total.outside_low, total.outside_high, jnp.asarray(outside, jnp.int32)
    )
    return Confusion(low, high, outside_low, outside_high)


def to_counts(total: Confusion) -> np.ndarray:
    """Host float64 counts from an accumulated confusion matrix (exact below 2**53)."""
    low = np.asarray(total.low, np.float64)
    high = np.asarray(total.high, np.float64)
    return high * 2.0**32 + low


def outside_count(total: Confusion) -> int:
    """Host count of the accumulated labels outside [0, C) that were not ignored."""
    return int(total.outside_high) * 2**32 + int(total.outside_low)


def segmentation_metrics(
    confusion, class_names: list[str] | None = None
) -> dict[str, float | np.ndarray]:
    """mIoU, per-class IoU, aAcc, mAcc, per-class accuracy and fwIoU from a [C, C] matrix.

    Rows are labels, columns predictions (`confusion_matrix`'s layout). Per-class values
    are NaN for a class without union (IoU) or without labelled pixels (accuracy); means
    skip NaN. With `class_names`, per-class IoU is also returned as `iou/<name>`.
    """
    if isinstance(confusion, Confusion):
        confusion = to_counts(confusion)
    m = np.asarray(confusion, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {m.shape}")
    tp = np.diag(m)
    labelled = m.sum(axis=1)
    predicted = m.sum(axis=0)
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (labelled + predicted - tp)
        acc = tp / labelled
        freq = labelled / total if total else np.zeros_like(labelled)
    results: dict[str, float | np.ndarray] = {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "aacc": float(tp.sum() / total) if total else float("nan"),
        "fwiou": float(np.nansum(freq * iou)),
        "iou": iou,
        "acc": acc,
    }
    if class_names is not None:
        if len(class_names) != len(iou):
            raise ValueError(f"{len(class_names)} class names for {len(iou)} classes")
        results.update({f"iou/{name}": float(v) for name, v in zip(class_names, iou, strict=True)})
    return results
