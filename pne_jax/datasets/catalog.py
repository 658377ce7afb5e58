"""Find a dataset by name, build its builder, and read a prepared split.

Names: the short names `cityscapes`, `ade20k`, `coco_stuff164k`, `synthetic`, or the
registered tfds names (`cityscapes_semseg`, ...). Reading never prepares anything: an
unprepared dataset raises `NotPreparedError` with the command that prepares it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from pne_jax.datasets import DEFAULT_STORAGE, STORAGE_FORMS, hide_accelerators_from_tf
from pne_jax.datasets.ade20k import Ade20kSemseg
from pne_jax.datasets.cityscapes import CityscapesSemseg
from pne_jax.datasets.coco_stuff import CocoStuff164kSemseg
from pne_jax.datasets.labels import dataset_name
from pne_jax.datasets.semseg import SemSegBuilder
from pne_jax.datasets.synthetic import SyntheticConfig, SyntheticSemseg

BUILDERS: dict[str, type[SemSegBuilder]] = {
    "cityscapes": CityscapesSemseg,
    "ade20k": Ade20kSemseg,
    "coco_stuff164k": CocoStuff164kSemseg,
    "synthetic": SyntheticSemseg,
}
hide_accelerators_from_tf()  # before any TensorFlow op runs: TensorFlow only reads data

SYNTHETIC_OPTIONS = ("num_train", "num_validation", "height", "width", "seed")


class NotPreparedError(FileNotFoundError):
    """The dataset is not (completely) prepared in the data dir."""


def builder_class(name: str) -> type[SemSegBuilder]:
    """The builder class for a short or registered name (ValueError listing the known ones)."""
    return BUILDERS[dataset_name(name)]


def make_builder(name: str, data_dir: str | os.PathLike, **options: Any) -> SemSegBuilder:
    """A builder for `name` in `data_dir`, prepared or not.

    Options: for `synthetic`, any of num_train, num_validation, height, width, seed (they pick
    the config, hence the folder); for the others, `expected_split_sizes` ("official", a dict
    of split -> count, or None to skip the check); for all, `storage` (`STORAGE_FORMS`:
    "encoded", the default, or "raw", in its own folder).
    """
    cls = builder_class(name)
    kwargs: dict[str, Any] = {"data_dir": os.path.expanduser(os.fspath(data_dir))}
    if cls is SyntheticSemseg:
        config = SyntheticConfig(**{k: options.pop(k) for k in SYNTHETIC_OPTIONS if k in options})
        named = config.name in {c.name for c in cls.BUILDER_CONFIGS}
        kwargs["config"] = config.name if named else config  # a name: no "custom config" warning
    unknown = set(options) - {"expected_split_sizes", "storage"}
    if unknown:
        raise TypeError(f"{cls.name}: unknown option(s) {sorted(unknown)}")
    return cls(**kwargs, **options)


def prepare_command(builder: SemSegBuilder) -> str:
    """The shell command that prepares `builder`'s dataset."""
    short = next(s for s, c in BUILDERS.items() if isinstance(builder, c))
    cmd = f"python -m pne_jax prepare --dataset={short} --data_dir={builder.data_dir_root}"
    if isinstance(builder, SyntheticSemseg):
        cfg = builder.builder_config
        cmd += "".join(f" --{k}={getattr(cfg, k)}" for k in SYNTHETIC_OPTIONS)
    else:
        cmd += " --manual_dir=DIR"
    if builder.storage != DEFAULT_STORAGE:
        cmd += f" --storage={builder.storage}"
    return cmd


def _other_storage(name: str, data_dir: str | os.PathLike, options: dict[str, Any]):
    """A builder of the same dataset prepared in another storage form than `options` asks
    for, or None."""
    for storage in STORAGE_FORMS:
        if storage != options.get("storage", DEFAULT_STORAGE):
            other = make_builder(name, data_dir, **{**options, "storage": storage})
            if other.is_prepared():
                return other
    return None


def load_builder(name: str, data_dir: str | os.PathLike, **options: Any) -> SemSegBuilder:
    """The builder of a prepared dataset; raises `NotPreparedError` if it is not prepared."""
    builder = make_builder(name, data_dir, **options)
    exists = builder.data_path.exists()
    if not (exists and builder.is_prepared()):
        state = "is incomplete (delete it and prepare again)" if exists else "does not exist"
        other = None if exists else _other_storage(name, data_dir, options)
        if other is not None:
            raise NotPreparedError(
                f"{builder.name} is prepared in the {other.storage!r} storage form at "
                f"{other.data_path}, not in the {builder.storage!r} form asked for "
                f"({builder.data_path} {state}). Prepare the {builder.storage!r} form with: "
                f"{prepare_command(builder)}; or read the {other.storage!r} form "
                f"(config.data.storage={other.storage!r})"
            )
        raise NotPreparedError(
            f"{builder.name} is not prepared: {builder.data_path} {state}. "
            f"Prepare it with: {prepare_command(builder)}"
        )
    builder.check_prepared_storage(f"prepare again with: {prepare_command(builder)}")
    problem = builder.prepared_size_problem()
    if problem:  # a subset prepared on purpose is fine to read, but say so
        logging.warning("%s; reading it as it is", problem)
    return builder


def data_source(
    name: str, split: str, data_dir: str | os.PathLike, **options: Any
) -> Sequence[dict[str, Any]]:
    """Random access to a prepared split: `len(src)`, `src[i]` -> {"image": uint8 [H, W, 3],
    "label": uint8 [H, W], "name": bytes}. Picklable, so grain workers can use it."""
    return load_builder(name, data_dir, **options).as_data_source(split)


def tf_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    **options: Any,
) -> tf.data.Dataset:
    """A `tf.data` pipeline over a prepared split, decoded in TensorFlow.

    tfds cannot stream ArrayRecord through `as_dataset`, so the records are read by index
    (one small Python call per record, bytes only) and parsed and decoded by TF ops.
    """
    builder = load_builder(name, data_dir, **options)
    raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    indices = tf.data.Dataset.range(len(raw))
    if shuffle:
        indices = indices.shuffle(len(raw), seed=seed, reshuffle_each_iteration=True)

    def read(index: tf.Tensor) -> tf.Tensor:
        record = tf.py_function(lambda i: raw[int(i)], [index], tf.string)
        record.set_shape(())
        return record

    features = builder.info.features
    # Encoded images get PIL's exact decoding; raw records have one decoding (raw_pixels).
    decoders = {"image": _decode_image()} if builder.storage == DEFAULT_STORAGE else None

    def parse(record: tf.Tensor) -> dict[str, tf.Tensor]:
        return features.deserialize_example(record, decoders=decoders)

    return indices.map(read).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


@tfds.decode.make_decoder()
def _decode_image(data: tf.Tensor, feature: tfds.features.Image) -> tf.Tensor:
    """uint8 [H, W, 3] from JPEG or PNG bytes, pixel for pixel as PIL (and `data_source`)
    decodes them: TensorFlow's default JPEG IDCT is the fast, inexact one (off by up to 4).
    Stored PNGs are 8-bit RGB or greyscale (`semseg.read_image` converts any other image by
    `images.to_rgb` before storing it), so `decode_png` never has to reduce 16-bit samples."""
    del feature
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(data, channels=3),
    )
    image.set_shape((None, None, 3))
    return image
