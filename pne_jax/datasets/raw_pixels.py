"""uint8 pixel arrays stored to decode fast: the `raw` storage form of the prepared datasets.

A PNG costs about 70 ms to decode at Cityscapes' 2048 x 1024 on one core, which bounds the
training stream at about 14 images/s per core. This form stores the pixels themselves as row
deltas (PNG's "up" filter: each row minus the one above, modulo 256), and leaves the entropy
coding to ArrayRecord, which compresses every record with zstd as tfds writes it. Undoing the
deltas is one vector add per row, so reading an example costs the zstd pass and a copy.

Measured on fake Cityscapes examples (`python -m benchmarks.bench_input`; see the README):
about the PNG form's disk size, several times faster to read. For JPEG datasets (ADE20K,
COCO-Stuff) the raw form takes about 10x the disk of the JPEG bytes for a decode that costs
little there; it is meant for PNG datasets.

Record: `b"PNER"`, then height, width, channels as little-endian uint32, then the deltas
[H, W * channels] row by row. Decoded by NumPy (`decode`, what `tfds.data_source` and grain
use) or by TensorFlow ops (`decode_tf`, what `catalog.tf_dataset` uses), bit-identically.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

MAGIC = b"PNER"
_HEADER = struct.Struct("<4sIII")


def encode(array: np.ndarray) -> bytes:
    """The record of a uint8 [H, W] or [H, W, C] array (C >= 1)."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"raw pixels must be uint8 [H, W] or [H, W, C], got {array.dtype} {array.shape}"
        )
    h, w = array.shape[:2]
    c = array.shape[2] if array.ndim == 3 else 1
    rows = np.ascontiguousarray(array).reshape(h, w * c)
    deltas = rows.copy()
    np.subtract(rows[1:], rows[:-1], out=deltas[1:])  # wraps modulo 256, as uint8 does
    return _HEADER.pack(MAGIC, h, w, c) + deltas.tobytes()


def _header(data: bytes) -> tuple[int, int, int]:
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise ValueError("not a raw-pixels record (no PNER header): the data is another form")
    _, h, w, c = _HEADER.unpack_from(data)
    if len(data) != _HEADER.size + h * w * c:
        raise ValueError(
            f"raw-pixels record of {len(data)} bytes does not hold {h}x{w}x{c} pixels: "
            "the prepared data is damaged; prepare it again"
        )
    return h, w, c


def decode(data: bytes, squeeze: bool = False) -> np.ndarray:
    """uint8 [H, W, C] (or [H, W] with `squeeze` and C = 1) from a record of `encode`."""
    h, w, c = _header(data)
    deltas = np.frombuffer(data, np.uint8, h * w * c, offset=_HEADER.size).reshape(h, w * c)
    rows = np.empty((h, w * c), np.uint8)
    if h:
        rows[0] = deltas[0]
    for i in range(1, h):  # a row at a time: 20x faster than np.cumsum along the rows
        np.add(rows[i - 1], deltas[i], out=rows[i])
    return rows.reshape(h, w) if squeeze and c == 1 else rows.reshape(h, w, c)


def decode_tf(data: tf.Tensor, channels: int | None) -> tf.Tensor:
    """`decode` in TensorFlow ops: uint8 [H, W, channels], or [H, W] for channels=None."""
    header = tf.io.decode_raw(tf.strings.substr(data, 4, 12), tf.int32, little_endian=True)
    size = _HEADER.size
    deltas = tf.io.decode_raw(
        tf.strings.substr(data, size, tf.strings.length(data) - size), tf.uint8
    )
    shape = header[:2] if channels is None else header
    return tf.math.cumsum(tf.reshape(deltas, shape), axis=0)  # uint8: wraps modulo 256


class RawPixels(tfds.features.FeatureConnector):
    """A uint8 [H, W, channels] array (channels=None: [H, W]) stored as a raw-pixels record."""

    def __init__(self, *, channels: int | None = 3, doc: Any = None):
        super().__init__(doc=doc)
        self.channels = channels

    def get_tensor_info(self) -> tfds.features.TensorInfo:
        shape = (None, None) if self.channels is None else (None, None, self.channels)
        return tfds.features.TensorInfo(shape=shape, dtype=np.uint8)

    def get_serialized_info(self) -> tfds.features.TensorInfo:
        return tfds.features.TensorInfo(shape=(), dtype=np.object_)

    def encode_example(self, array: np.ndarray) -> bytes:
        array = np.asarray(array)
        want = 2 if self.channels is None else 3
        if array.ndim != want or (self.channels and array.shape[-1] != self.channels):
            shape = "[H, W]" if self.channels is None else f"[H, W, {self.channels}]"
            raise ValueError(f"expected uint8 {shape}, got {array.dtype} {array.shape}")
        return encode(array)

    def decode_example(self, example: tf.Tensor) -> tf.Tensor:
        return decode_tf(example, self.channels)

    def decode_example_np(self, example: bytes) -> np.ndarray:
        return decode(example, squeeze=self.channels is None)

    @classmethod
    def from_json_content(cls, value: dict[str, Any], doc: Any = None) -> RawPixels:
        return cls(channels=value.get("channels"), doc=doc)

    def to_json_content(self) -> dict[str, Any]:
        return {"channels": self.channels}
