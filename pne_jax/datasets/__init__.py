"""Segmentation datasets as tfds builders (ArrayRecord), their label tables, and how to read them.

    from pne_jax import datasets

    datasets.prepare("synthetic", "/tmp/tfds")             # once; later calls do nothing
    train = datasets.data_source("synthetic", "train", "/tmp/tfds")
    example = train[0]      # {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": bytes}
    meta = datasets.dataset_meta("synthetic")   # num_classes, class_names, palette, ignore_index

Builders (registered with tfds when `catalog` is imported): cityscapes_semseg, ade20k_semseg,
coco_stuff164k_semseg, synthetic_semseg. The label tables (`labels`: class names, palettes,
id maps) need only NumPy; the rest imports TensorFlow on first use, and TensorFlow is then
told to see no GPU or TPU, so it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from pne_jax.datasets.labels import (
    DATASETS,
    DatasetMeta,
    class_names_for,
    dataset_meta,
    dataset_name,
    is_known_dataset,
)

DEFAULT_DATA_DIR = "~/tensorflow_datasets"
"""Where datasets are prepared and read unless `--data_dir` / `config.data.data_dir` says."""

STORAGE_FORMS = ("encoded", "raw")
"""How examples are stored (`pne-jax prepare --storage`, `config.data.storage`): `encoded`,
the source's image bytes (PNG or JPEG) and PNG labels, the default and the least disk;
`raw`, decoded pixels (`raw_pixels`), several times faster to read, in its own folder."""
DEFAULT_STORAGE = STORAGE_FORMS[0]

# Public names that need TensorFlow, and the module that defines each (imported on access).
_LAZY = {
    "BUILDERS": "catalog",
    "NotPreparedError": "catalog",
    "builder_class": "catalog",
    "data_source": "catalog",
    "load_builder": "catalog",
    "make_builder": "catalog",
    "tf_dataset": "catalog",
    "prepare": "preparation",
}

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_STORAGE",
    "STORAGE_FORMS",
    "DatasetMeta",
    "class_names_for",
    "dataset_meta",
    "dataset_name",
    "hide_accelerators_from_tf",
    "is_known_dataset",
    *_LAZY,
]


def hide_accelerators_from_tf() -> None:
    """Makes TensorFlow (if installed) see only the CPU, so it never takes GPU memory or TPUs.

    Call it before any TensorFlow op runs; importing `catalog` calls it.
    """
    try:
        import tensorflow as tf  # a 5 s import, paid only where data is read
    except ImportError:
        return
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as e:  # TF already initialised (fine if none visible)
            if tf.config.get_visible_devices(kind):
                raise RuntimeError(
                    f"TensorFlow initialised its {kind}s before pne-jax could hide them; "
                    "import pne_jax.datasets before running any TensorFlow op"
                ) from e


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"pne_jax.datasets.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'pne_jax.datasets' has no attribute {name!r}")
