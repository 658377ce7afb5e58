"""The evaluation's preprocessing inside a jitted function: uint8 images of any sizes, padded
into one array, in; the model's normalised input batch out.

This is `augment.eval_transform` (resize to fit `test_size` keeping the ratio, PIL's
antialiased bilinear; ImageNet normalisation) plus the padding of the evaluation batches,
run on the device, so that a program taking raw uint8 pixels can be compiled and exported
(`pne_jax.segmenter`, `pne_jax.export`): a quarter of the float32 batch's transfer, and no
image resizing on the host.

Equal to the host path but for two documented differences:
- Pixels: PIL's bilinear filter, window and normalisation exactly (width pass, then height,
  each rounded to 8 bits), with float32 weights where PIL uses 22-bit fixed point, so a
  value whose exact result is a half, or within about 1e-4 of one, can round the other way:
  none differs from PIL's by more than one level; a few per thousand do when shrinking, up
  to 5% when enlarging by a simple ratio such as 1.2, where exact halves are common, none
  when the size is kept (tests/test_preprocess.py).

Each pass is one matrix product per image ([out, in] weights, built from the sizes at run
time, in full float32 precision): XLA's fastest form on CPU as on accelerators (15x a
gather of the filter's taps on CPU). A pass that changes no image's size of the batch is a
copy, as PIL skips it: Cityscapes' 1024 x 2048 frames at their test size cost no resizing.
- Sizes: `keep_ratio_sizes` rounds the exact rational size half up; MMCV's float arithmetic
  (`augment.keep_ratio_size`) gives the lower size in rare exact halves at extreme aspect
  ratios (55 x 704 -> 7.5 x 96 at test size 96 x 48: MMCV 7, here 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pne_jax import augment

Size = tuple[int, int]
# Integer size arithmetic in int32: 2 * side * test side must stay below 2**31.
LARGEST_SIDE = 16384


def _keep_ratio(xp, sizes, test_size: Size):
    long_edge, short_edge = max(test_size), min(test_size)
    sizes = xp.maximum(sizes.astype(xp.int32), 1)
    longer, shorter = sizes.max(axis=-1, keepdims=True), sizes.min(axis=-1, keepdims=True)
    by_long = long_edge * shorter <= short_edge * longer  # long / longer <= short / shorter
    num = xp.where(by_long, long_edge, short_edge)
    den = xp.where(by_long, longer, shorter)
    return xp.maximum((2 * sizes * num + den) // (2 * den), 1).astype(xp.int32)


def keep_ratio_sizes(sizes: jax.Array, test_size: Size) -> jax.Array:
    """int32 [b, 2]: each (h, w) of `sizes` [b, 2] rescaled to fit `test_size` (long, short
    edge, any order) keeping its ratio, as `augment.keep_ratio_size`, in exact integer
    arithmetic (halves round up)."""
    return _keep_ratio(jnp, sizes, test_size)


def resized_size(size: Size, test_size: Size) -> Size:
    """`keep_ratio_sizes` of one (h, w), on the host."""
    h, w = _keep_ratio(np, np.array([size]), test_size)[0]
    return int(h), int(w)


def _weights(in_len: jax.Array, out_len: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """float32 [out_size, in_size]: PIL's bilinear resampling of one axis from its first
    `in_len` entries to `out_len` (ImagingResample's coefficients: the triangle, widened by
    the ratio when shrinking, over PIL's window, normalised); rows at or beyond `out_len`
    and columns at or beyond `in_len` are zero."""
    in_f, out_f = in_len.astype(jnp.float32), jnp.maximum(out_len, 1).astype(jnp.float32)
    ratio = in_f / out_f
    support = jnp.maximum(ratio, 1.0)
    centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * ratio
    first = jnp.maximum(jnp.floor(centre - support + 0.5), 0.0).astype(jnp.int32)
    end = jnp.minimum(jnp.floor(centre + support + 0.5).astype(jnp.int32), in_len)
    index = jnp.arange(in_size)
    weight = jnp.maximum(
        1.0 - jnp.abs((index.astype(jnp.float32) - centre[:, None] + 0.5) / support), 0.0
    )
    window = (index >= first[:, None]) & (index < end[:, None])
    weight = jnp.where(window, weight, 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where((jnp.arange(out_size) < out_len)[:, None], weight, 0.0)


def _resize_axis(x: jax.Array, in_len, out_len, out_size: int, axis: int) -> jax.Array:
    """[b, H, W, 3] resized along `axis` (1: height, 2: width) from each image's first
    `in_len` [b] entries to `out_len` [b] (in an axis of `out_size`), rounded to 8 bits as
    PIL's passes are, zero beyond. A pass that changes no image's size copies (PIL skips it
    too); the others are one matrix product per image, in full float32 precision."""
    in_size = x.shape[axis]
    limit = jnp.arange(out_size) < out_len[:, None]  # [b, out_size]
    limit = limit[:, :, None, None] if axis == 1 else limit[:, None, :, None]

    def copy(x):
        if in_size >= out_size:
            kept = jax.lax.slice_in_dim(x, 0, out_size, axis=axis)
        else:
            pad = [(0, 0)] * 4
            pad[axis] = (0, out_size - in_size)
            kept = jnp.pad(x, pad)
        return jnp.where(limit, kept, 0.0)

    def resample(x):
        def one(image, n_in, n_out):
            w = _weights(n_in, n_out, in_size, out_size)
            spec = "oh,hwc->owc" if axis == 1 else "ow,hwc->hoc"
            return jnp.einsum(spec, w, image, precision=jax.lax.Precision.HIGHEST)

        out = jax.vmap(one)(x, in_len, out_len)
        return jnp.clip(jnp.floor(out + 0.5), 0.0, 255.0)

    return jax.lax.cond(jnp.all(in_len == out_len), copy, resample, x)


def resize_images(
    images: jax.Array, sizes: jax.Array, resized: jax.Array, out_shape: Size
) -> jax.Array:
    """float32 [b, *out_shape, 3] (integer values 0..255): the top-left `sizes` [b, 2] region
    of each uint8 image [b, H, W, 3] resized to `resized` [b, 2] as PIL's `Image.resize(...,
    BILINEAR)` (the width first, as PIL), at the top left, zero elsewhere."""
    out_shape = (int(out_shape[0]), int(out_shape[1]))
    x = images.astype(jnp.float32)
    x = _resize_axis(x, sizes[:, 1], resized[:, 1], out_shape[1], axis=2)
    return _resize_axis(x, sizes[:, 0], resized[:, 0], out_shape[0], axis=1)


def eval_batch(
    images: jax.Array,
    sizes: jax.Array,
    test_size: Size,
    canvas: Size,
) -> dict[str, jax.Array]:
    """The evaluation batch (`input_pipeline.eval_dataset`'s format: image, image_size,
    label_size) of uint8 images [b, H, W, 3] whose top-left `sizes` [b, 2] are the images:
    resized to fit `test_size` (`resize_images`), normalised, zero-padded to `canvas`
    (which must hold every resized image)."""
    canvas = (int(canvas[0]), int(canvas[1]))
    sizes = sizes.astype(jnp.int32)
    resized = keep_ratio_sizes(sizes, test_size)
    pixels = resize_images(images, sizes, resized, canvas)
    mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(augment.IMAGENET_STD, jnp.float32)
    inside = (jnp.arange(canvas[0])[:, None] < resized[:, None, None, 0]) & (
        jnp.arange(canvas[1]) < resized[:, None, None, 1]
    )
    image = jnp.where(inside[..., None], (pixels - mean) / std, 0.0)
    return {"image": image, "image_size": resized, "label_size": sizes}
