"""The training augmentation split in two: random draws on the host, pixel work on the device.

Why: `augment.train_transform` runs MMSegmentation's whole chain per example on the host, and
its PIL resize and 8-bit HSV make it cost about 28-37 ms of CPU per Cityscapes example, more
than the input pipeline's share of a step. Here the host only draws and slices
(`device_example`: about 3 ms, mostly the crop draws on the label), and one jitted
`augment_batch` does the resize, flip, photometric distortion, normalisation and padding of a
whole batch on the device: static shapes, no callbacks, no Python loops over data.

Host (`device_example`, one example, a pure function of its generator): `augment.train_draws`
(scale, crop window with its `cat_max_ratio` retries, flip, photometric draws, final label:
the same draws from the same generator as `train_transform`); the region of the ORIGINAL
image that PIL reads to resize the window (every tap of the bilinear filter, whose support
widens with the scale when shrinking), sliced out, not resampled, and zero-padded to a static
`source_size`; PIL's own 22-bit filter coefficients for both axes (Resample.c's
`precompute_coeffs` and `normalize_coeffs_8bpc` replayed in float64 NumPy: a few thousand
numbers, no pixels); and PIL's pass order (height first when it shrinks the height much more).

Device (`augment_batch`): each pass of PIL's separable resize is one matrix product per image
whose integer result is PIL's `clip8((sum of coefficient * pixel + 2**21) >> 22)`: the
coefficients are split in three bytes, so that every operand is an integer below 2**8 and
every sum of products one below 2**24, exact in float32 and also in the bf16 or TF32 inputs
that the default matmul precision may use on accelerators. The flip reverses the width
coefficients of the window. Brightness and contrast are float32 `clip(x * alpha + beta)`
truncated, as the host's tables (one of alpha and beta at a time, so no fused multiply-add
can change them). Saturation and hue reproduce PIL's 8-bit `convert("HSV")`, `point` and
`convert("RGB")` (Convert.c): RGB->HSV through tables made by PIL itself (the hue depends
only on which channel is largest and the other two's distances below it, the saturation on
(max - min, max)); HSV->RGB rounds `v * (1 - fs * f)` and its kin, computed by PIL in double,
from float32 tables of the factor: every such product lies at least 1.65e-5 from a rounding
boundary and the float32 error stays below 1.53e-5, so the result is PIL's (the tests check
all 2**24 triples both ways). Then `(x - mean) / std`, 0 outside the window.

Tolerance against `train_transform` (tests/test_device_augment.py, and 8 Cityscapes-size
examples): none in levels. Labels (retries, flips, ignore padding) are identical, and so are
the images' levels, `image * std + mean`, with or without resize and photometric steps: the
normalised values differ by float32 rounding only (at most 1.4e-5 of a level; XLA may divide
by multiplying with the reciprocal). The replay assumes PIL computes its coefficients in IEEE
double without fused multiply-adds, as its x86-64 wheels do; a build that fuses them (some
aarch64 ones) could differ by a level in rare pixels.

Fallback: where the region does not fit `source_size`, or needs more than `taps` filter taps
per output (shrinking by more than (taps - 1) / 2), the host resizes the window itself (PIL,
as `train_transform`) and sends it with identity coefficients, so the device copies it; the
example's `fallback` flag says so, for a benchmark to count. `check_source_size` refuses a
`source_size` that cannot hold a crop. A source size of the dataset's largest image never
falls back unless shrinking by more than 15 (Cityscapes: (1024, 2048), the images
themselves, the same bytes as the host's float32 crops of 512 x 1024).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pne_jax import augment

Size = tuple[int, int]
# PIL's fixed point for 8-bit images (Resample.c: 32 - 8 - 2 bits of fraction).
PRECISION_BITS = 22
# Filter taps per output sent to the device: shrinking by s needs 2 ceil(s) + 1, so 31 taps
# cover shrinking by up to 15. A byte of a coefficient times a pixel is below 2**16, so up to
# 256 taps keep every sum below 2**24, exact in float32.
MAX_TAPS = 31
_TAPS_LIMIT = 256

# --- Host ---------------------------------------------------------------------------------------


def check_source_size(crop_size: Size, source_size: Size) -> None:
    """Raises a one-line ValueError unless a crop fits in the device's source array."""
    if crop_size[0] > source_size[0] or crop_size[1] > source_size[1]:
        raise ValueError(
            f"config.data.crop_size {tuple(crop_size)} does not fit in "
            f"config.data.device_source_size {tuple(source_size)}: make device_source_size at "
            "least crop_size in both dimensions (or lower crop_size)"
        )


def pil_bilinear_taps(
    in_size: int, in0: float, in1: float, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's bilinear coefficients for resizing [in0, in1) of an axis of `in_size` to `out_size`
    (`Image.resize(..., BILINEAR, box=...)`): (first tap int64 [out], tap count int64 [out],
    22-bit coefficients int64 [out, n]), replaying Resample.c's `precompute_coeffs` (box
    edges in float32, the rest in double, the same operations in the same order) and
    `normalize_coeffs_8bpc`."""
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(in1 - in0)) / out_size
    support = max(scale, 1.0)  # the filter's support (1) times max(scale, 1)
    inv_filterscale = 1.0 / support
    center = float(in0) + (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    n = int(count.max())
    weights = np.zeros((out_size, n))
    total = np.zeros(out_size)
    for x in range(n):  # the running sum in PIL's order
        t = ((x + first) - center + 0.5) * inv_filterscale
        w = np.where((x < count) & (np.abs(t) < 1.0), 1.0 - np.abs(t), 0.0)
        weights[:, x] = w
        total = total + w
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    return first, count, (0.5 + weights * (1 << PRECISION_BITS)).astype(np.int64)


def _identity_taps(start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps that copy `length` entries from `start` on."""
    ones = np.full((length, 1), 1 << PRECISION_BITS, np.int64)
    return start + np.arange(length), np.ones(length, np.int64), ones


def photometric_params(
    draws: augment.PhotometricDraws | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`photometric`'s inputs for one image: (float32 [4] brightness beta, contrast alpha,
    saturation factor, hue shift in OpenCV units; bool [4] which of them run; bool [] contrast
    last). None (no distortion) turns every step off."""
    values, on = np.array([0.0, 1.0, 1.0, 0.0], np.float32), np.zeros(4, bool)
    if draws is None:
        return values, on, np.asarray(False)
    steps = (draws.brightness, draws.contrast, draws.saturation, draws.hue)
    for k, value in enumerate(steps):
        if value is not None:
            values[k], on[k] = value, True
    return values, on, np.asarray(draws.contrast_last)


def _padded(array: np.ndarray, shape, dtype) -> np.ndarray:
    out = np.zeros(shape, dtype)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out


def device_example(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    aug: augment.TrainAugment,
    source_size: Size,
    *,
    taps: int = MAX_TAPS,
) -> dict[str, np.ndarray]:
    """One training example for `augment_batch`: `augment.train_transform(rng, image, label,
    aug)` with its pixel work left to the device (same draws, same generator use).

    Returns, with (ch, cw) = aug.crop_size and (Hs, Ws) = source_size:
      source uint8 [Hs, Ws, 3]: the region of `image` the resize reads, zero-padded;
      region_size int32 [2]: its (h, w) inside `source`;
      window_size int32 [2]: (h, w) of the resized window, at most crop_size;
      x_start int32 [cw], x_taps int32 [cw, taps]: per output column, the first source
        column and PIL's 22-bit coefficients (zero beyond the window); y_start int32 [ch],
        y_taps int32 [ch, taps]: the same for rows;
      vertical_first bool []: PIL resizes the height first;
      flip bool []: mirror left-right;
      photometric float32 [4]: brightness beta, contrast alpha, saturation factor, hue shift
        (OpenCV units); photometric_on bool [4]: which of the four steps run;
        contrast_last bool []: contrast after saturation and hue rather than before;
      label int32 [ch, cw]: final (ignore_index in the padding);
      fallback bool []: the host resized the window (see the module docstring).
    """
    augment.check_example(image, label)
    check_source_size(aug.crop_size, source_size)
    if not 1 <= taps <= _TAPS_LIMIT:
        raise ValueError(f"taps must be in [1, {_TAPS_LIMIT}], got {taps}")
    draws = augment.train_draws(rng, label, aug)
    (height, width), (ch, cw) = label.shape, aug.crop_size
    y0, x0, h, w = draws.window
    vertical_first = False
    if (height, width) == draws.size:  # train_transform slices: no resampling at all
        rows, cols = _identity_taps(y0, h), _identity_taps(x0, w)
    else:
        sy, sx = height / draws.size[0], width / draws.size[1]
        rows = pil_bilinear_taps(height, y0 * sy, (y0 + h) * sy, h)
        cols = pil_bilinear_taps(width, x0 * sx, (x0 + w) * sx, w)
        # ImagingResampleInner's rule, on the whole image and the output size.
        vertical_first = height - h > 0 and height - h > (width - w) * 2
    region = [(int(a[0][0]), int((a[0] + a[1]).max())) for a in (rows, cols)]
    region_size = (region[0][1] - region[0][0], region[1][1] - region[1][0])
    fits = region_size[0] <= source_size[0] and region_size[1] <= source_size[1]
    fallback = not (fits and rows[2].shape[1] <= taps and cols[2].shape[1] <= taps)
    if fallback:
        source = augment.resize_window(image, draws.size, draws.window)
        rows, cols, vertical_first = _identity_taps(0, h), _identity_taps(0, w), False
        region_size = (h, w)
    else:
        source = image[region[0][0] : region[0][1], region[1][0] : region[1][1]]
        rows = (rows[0] - region[0][0], *rows[1:])
        cols = (cols[0] - region[1][0], *cols[1:])

    values, on, contrast_last = photometric_params(draws.photometric)
    return {
        "source": _padded(source, (*source_size, 3), np.uint8),
        "region_size": np.asarray(region_size, np.int32),
        "window_size": np.asarray((h, w), np.int32),
        "x_start": _padded(cols[0], (cw,), np.int32),
        "x_taps": _padded(cols[2], (cw, taps), np.int32),
        "y_start": _padded(rows[0], (ch,), np.int32),
        "y_taps": _padded(rows[2], (ch, taps), np.int32),
        "vertical_first": np.asarray(vertical_first),
        "flip": np.asarray(draws.flip),
        "photometric": values,
        "photometric_on": on,
        "contrast_last": contrast_last,
        "label": draws.label.astype(np.int32),
        "fallback": np.asarray(fallback),
    }


# --- Device: resize -----------------------------------------------------------------------------


def _dense(start: jax.Array, taps: jax.Array, in_size: int) -> jax.Array:
    """int32 [out, in_size]: row o holds taps[o] from column start[o] on, zeros elsewhere."""
    n = taps.shape[-1]
    offset = jnp.arange(in_size, dtype=jnp.int32) - start[:, None]
    inside = (offset >= 0) & (offset < n)
    return jnp.where(inside, jnp.take_along_axis(taps, jnp.clip(offset, 0, n - 1), axis=1), 0)


def _resample(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    """One PIL pass over `axis` (0: height, 1: width) of x float32 [H, W, 3] (integers 0-255)
    with 22-bit weights int32 [out, in]: clip8((sum w * x + 2**21) >> 22), exactly."""
    pieces = [(weights >> shift) & 255 for shift in (16, 8, 0)]
    spec = "oi,iwc->owc" if axis == 0 else "oi,hic->hoc"
    # Bytes times 8-bit pixels, summed: integers below 2**24, exact in float32 and in bf16 or
    # TF32 inputs (8 significant bits suffice) with float32 sums, so any precision will do.
    sums = jnp.einsum(spec, jnp.concatenate(pieces).astype(jnp.float32), x)
    high, middle, low = jnp.split(sums.astype(jnp.int32), 3, axis=axis)
    total = (high << 16) + (middle << 8) + low + (1 << (PRECISION_BITS - 1))
    return jnp.clip(total >> PRECISION_BITS, 0, 255).astype(jnp.float32)


def resize_windows(batch: Mapping[str, jax.Array]) -> jax.Array:
    """float32 [b, ch, cw, 3] (integer levels, 0 beyond each window): every `source` resized by
    its taps as PIL does (the width pass first unless `vertical_first`), flipped where `flip`."""
    source = jnp.asarray(batch["source"]).astype(jnp.float32)
    _, hs, ws, _ = source.shape
    x_start, x_taps = jnp.asarray(batch["x_start"]), jnp.asarray(batch["x_taps"])
    cw = x_start.shape[1]
    # The flip reverses the window's output columns, i.e. the rows of its width taps.
    width = jnp.asarray(batch["window_size"])[:, 1:]
    column = jnp.arange(cw)
    order = jnp.where(
        jnp.asarray(batch["flip"])[:, None] & (column < width), width - 1 - column, column
    )
    x_start = jnp.take_along_axis(x_start, order, axis=1)
    x_taps = jnp.take_along_axis(x_taps, order[..., None], axis=1)
    wx = jax.vmap(_dense, (0, 0, None))(x_start, x_taps, ws)
    wy = jax.vmap(_dense, (0, 0, None))(batch["y_start"], batch["y_taps"], hs)

    def width_first():
        return jax.vmap(lambda s, a, b: _resample(_resample(s, a, 1), b, 0))(source, wx, wy)

    def height_first():
        return jax.vmap(lambda s, a, b: _resample(_resample(s, b, 0), a, 1))(source, wx, wy)

    vertical = jnp.asarray(batch["vertical_first"])

    def both():
        return jnp.where(vertical[:, None, None, None], height_first(), width_first())

    # Only batches with a height-first example (portrait crops of wider images) pay for both.
    return jax.lax.cond(jnp.any(vertical), both, width_first)


# --- Device: photometric distortion -------------------------------------------------------------


@functools.cache
def _hsv_tables() -> dict[str, np.ndarray]:
    """PIL's 8-bit HSV conversion as tables. RGB->HSV (Convert.c `rgb2hsv_row`) is made by PIL
    itself: the hue depends only on which channel is the largest (the first of r, g, b that
    is) and the other two channels' distances below it, uint8 [3 * 256 * 256]; the saturation
    on (max - min, max), uint8 [256 * 256]. HSV->RGB (`hsv2rgb`) rounds v * (1 - fs),
    v * (1 - fs * f) and v * (1 - fs * (1 - f)) in double; the factors, in double rounded to
    float32, are the tables wp [256] (by s) and wq, wt [256 * 256] (by h, s)."""
    d1, d2 = (a.ravel() for a in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    top = np.full_like(d1, 255)
    rgb = [(top, top - d1, top - d2), (top - d1, top, top - d2), (top - d1, top - d2, top)]
    rgb = np.concatenate([np.stack(c, -1) for c in rgb]).astype(np.uint8)
    hue = np.asarray(Image.fromarray(rgb.reshape(768, 256, 3)).convert("HSV"))[..., 0]
    spread, top = d1, d2  # saturation: (max - min, max), max - min <= max
    grey = np.maximum(top - spread, 0)
    rgb = np.stack([top, grey, grey], -1).astype(np.uint8)
    saturation = np.asarray(Image.fromarray(rgb.reshape(256, 256, 3)).convert("HSV"))[..., 1]
    h, s = d1.astype(np.float64), d2.astype(np.float64)
    f = (h * 6.0 / 255.0 - np.floor(h * 6.0 / 255.0)).astype(np.float32).astype(np.float64)
    fs = (s / 255.0).astype(np.float32).astype(np.float64)
    return {
        "hue": hue.ravel(),
        "saturation": saturation.ravel(),
        "wp": (1.0 - fs[:256]).astype(np.float32),
        "wq": (1.0 - fs * f).astype(np.float32),
        "wt": (1.0 - fs * (1.0 - f)).astype(np.float32),
    }


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """int32 [..., 3] HSV of int32 RGB [..., 3] (0-255), as PIL's `convert("HSV")`."""
    tables = _hsv_tables()
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, bottom = jnp.maximum(jnp.maximum(r, g), b), jnp.minimum(jnp.minimum(r, g), b)
    branch = jnp.where(r == top, 0, jnp.where(g == top, 1, 2))
    near = top - jnp.where(branch == 0, g, r)
    far = top - jnp.where(branch == 2, g, b)
    hue = jnp.asarray(tables["hue"])[branch * 65536 + near * 256 + far]
    saturation = jnp.asarray(tables["saturation"])[(top - bottom) * 256 + top]
    return jnp.stack([hue.astype(jnp.int32), saturation.astype(jnp.int32), top], -1)


def _round_half_up(x: jax.Array) -> jax.Array:
    """C's round() of a positive float32, comparing the exact remainder with 1/2."""
    whole = jnp.floor(x)
    return (whole + (x - whole >= 0.5)).astype(jnp.int32)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """int32 [..., 3] RGB of int32 HSV [..., 3] (0-255), as PIL's `convert("RGB")`."""
    tables = _hsv_tables()
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    value = v.astype(jnp.float32)
    p = _round_half_up(value * jnp.asarray(tables["wp"])[s])
    q = _round_half_up(value * jnp.asarray(tables["wq"])[h * 256 + s])
    t = _round_half_up(value * jnp.asarray(tables["wt"])[h * 256 + s])
    sector = (6 * h // 255) % 6  # floor(h * 6 / 255), never within rounding of an integer
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = [jnp.select([sector == i for i in range(6)], [c[k] for c in choices]) for k in range(3)]
    return jnp.where((s == 0)[..., None], v[..., None], jnp.stack(rgb, -1))


def _affine(x: jax.Array, alpha=1.0, beta=0.0) -> jax.Array:
    """The host's `_affine_lut` per pixel: clip(x * alpha + beta, 0, 255) truncated, float32.
    Called with alpha or beta only, so no fused multiply-add can change a value."""
    return jnp.floor(jnp.clip(x * alpha + beta, 0.0, 255.0))


def photometric(
    images: jax.Array, values: jax.Array, on: jax.Array, contrast_last: jax.Array
) -> jax.Array:
    """`augment.apply_photometric` of float32 images [b, h, w, 3] (integer levels) with the
    draws of `device_example` (values float32 [b, 4], on bool [b, 4], contrast_last bool [b]):
    float32 [b, h, w, 3], integer levels. Every step is computed and selected per image."""
    x = jnp.asarray(images, jnp.float32)
    values, on = jnp.asarray(values, jnp.float32), jnp.asarray(on)
    last = jnp.asarray(contrast_last)[:, None, None, None]
    beta, alpha, factor = (values[:, k, None, None, None] for k in range(3))
    use = [on[:, k, None, None, None] for k in range(4)]
    x = jnp.where(use[0], _affine(x, beta=beta), x)
    x = jnp.where(use[1] & ~last, _affine(x, alpha=alpha), x)
    hsv = rgb_to_hsv(x.astype(jnp.int32))
    # PIL's hue has 256 steps per turn, OpenCV's unit is 2 degrees: round(hue * 64 / 45),
    # never an exact half, in integers.
    hue = values[:, 3].astype(jnp.int32)
    shift = jnp.where(on[:, 3], jnp.floor_divide(128 * hue + 45, 90), 0)[:, None, None]
    saturation = hsv[..., 1].astype(jnp.float32)
    saturation = jnp.where(use[2][..., 0], _affine(saturation, alpha=factor[..., 0]), saturation)
    hsv = jnp.stack([(hsv[..., 0] + shift) % 256, saturation.astype(jnp.int32), hsv[..., 2]], -1)
    x = jnp.where(use[2] | use[3], hsv_to_rgb(hsv).astype(jnp.float32), x)
    return jnp.where(use[1] & last, _affine(x, alpha=alpha), x)


# --- Device: the batch --------------------------------------------------------------------------


def augment_batch(
    batch: Mapping[str, jax.Array], aug: augment.TrainAugment
) -> dict[str, jax.Array]:
    """The training batch from a batch of `device_example`s (stacked): {"image": float32
    [b, ch, cw, 3] (resized, flipped, distorted, normalised with aug.mean / aug.std, 0 in the
    padding), "label": int32 [b, ch, cw] (passed through)}. Jittable with `aug` static."""
    ch, cw = aug.crop_size
    label = jnp.asarray(batch["label"])
    if label.shape[1:] != (ch, cw):
        raise ValueError(f"batch labels are {label.shape[1:]}, aug.crop_size is {(ch, cw)}")
    x = resize_windows(batch)
    if aug.photometric:
        x = photometric(x, batch["photometric"], batch["photometric_on"], batch["contrast_last"])
    mean, std = jnp.asarray(aug.mean, jnp.float32), jnp.asarray(aug.std, jnp.float32)
    size = jnp.asarray(batch["window_size"])
    inside = (jnp.arange(ch)[:, None] < size[:, None, None, 0]) & (
        jnp.arange(cw) < size[:, None, None, 1]
    )
    return {"image": jnp.where(inside[..., None], (x - mean) / std, 0.0), "label": label}
