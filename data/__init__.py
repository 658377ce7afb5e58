"""Segmentation datasets as tfds builders (ArrayRecord), and how to read them.

    from data import data_source, dataset_meta
    from data.prepare import prepare

    prepare("synthetic", "/tmp/tfds")                    # once; later calls do nothing
    train = data_source("synthetic", "train", "/tmp/tfds")
    example = train[0]      # {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": bytes}
    meta = dataset_meta("synthetic")   # num_classes, class_names, palette, ignore_index (255)

Builders (registered with tfds on import): cityscapes_semseg, ade20k_semseg,
coco_stuff164k_semseg, synthetic_semseg. TensorFlow only reads data here: importing this
package hides every GPU and TPU from it, so it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging


def _hide_accelerators_from_tensorflow() -> None:
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as e:  # already initialised, or no such device type
            if tf.config.get_visible_devices(kind):
                logging.warning("could not hide %s devices from TensorFlow: %s", kind, e)


_hide_accelerators_from_tensorflow()

from data.catalog import (  # noqa: E402  (TensorFlow must be configured first)
    BUILDERS,
    NotPreparedError,
    builder_class,
    data_source,
    dataset_meta,
    load_builder,
    make_builder,
    tf_dataset,
)
from data.labels import DatasetMeta  # noqa: E402

__all__ = [
    "BUILDERS",
    "DatasetMeta",
    "NotPreparedError",
    "builder_class",
    "data_source",
    "dataset_meta",
    "load_builder",
    "make_builder",
    "tf_dataset",
]
