"""Losses: the PNE contrastive loss, the ICCV 2021 pixel contrast, and their building blocks."""

from pne_jax.losses.pixel_contrast import (
    PixelContrastSample,
    PixelContrastStats,
    pixel_contrast_loss,
    pixel_contrast_reduce,
    pixel_contrast_sample,
    pixel_contrast_stats,
)
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
    "PixelContrastSample",
    "PixelContrastStats",
    "pne_batch_stats",
    "pne_image_stats",
    "pne_loss",
    "pne_reduce",
    "pixel_contrast_loss",
    "pixel_contrast_reduce",
    "pixel_contrast_sample",
    "pixel_contrast_stats",
    "resize_labels_nearest",
    "validate_labels",
]
