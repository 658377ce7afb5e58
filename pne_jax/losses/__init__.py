"""Losses: the PNE contrastive loss and its building blocks."""

from pne_jax.losses.pne import (
    NORM_EPSILON,
    PNEStats,
    pne_batch_stats,
    pne_image_stats,
    pne_loss,
    pne_reduce,
    resize_labels_nearest,
    validate_labels,
)

__all__ = [
    "NORM_EPSILON",
    "PNEStats",
    "pne_batch_stats",
    "pne_image_stats",
    "pne_loss",
    "pne_reduce",
    "resize_labels_nearest",
    "validate_labels",
]
