"""Joint image + label augmentations for semantic segmentation, MMSegmentation's recipe in NumPy.

Every function is pure: randomness comes only from the `np.random.Generator` passed in, so an
example's augmentation is reproducible from its generator's seed. Images are uint8 RGB
`[H, W, 3]`, labels uint8 `[H, W]` with `ignore_index` (255) for unlabelled pixels.

The training chain is MMSegmentation's (`RandomResize` with `keep_ratio`, `RandomCrop` with
`cat_max_ratio`, `RandomFlip`, `PhotoMetricDistortion`, then the data preprocessor's normalise
and pad), with random draws in the same order and with the same distributions: fed the same
draws, MMSegmentation picks the same scales, crop windows (retries included) and brightness
and contrast (tests/test_mmseg_parity.py). Deliberate differences, all in how pixels are
resampled:

- Images are resized bilinearly with PIL (half-pixel centres, antialiased when shrinking;
  OpenCV does not antialias). Labels use nearest neighbour with half-pixel centres: output pixel
  `i` takes input pixel `floor((i + 0.5) * in / out)`, aligned with the bilinear image (OpenCV's
  nearest takes `floor(i * in / out)`, half a pixel off). Labels never take new values.
- `train_transform` resizes only the crop window of the image (PIL's `box`), so a 2x rescale
  costs a crop's worth of work, not four images'. It equals `rescale` then `random_crop` with the
  same generator: labels exactly, images to within PIL's rounding (a level or two of 255).
- Hue and saturation use PIL's 8-bit HSV (hue in 256 steps, OpenCV's in 180), converting once
  when both apply where MMSegmentation converts twice: at most 1.7 levels apart on average.

The draws are separable from the pixel work: `train_draws` (and `photometric_draws`) consume
the generator exactly as `train_transform` (and `photometric_distortion`) do and return the
parameters, so the pixels can be computed elsewhere (`pne_jax.device_augment`, on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
# MMSegmentation's RandomCrop: one crop plus up to 10 retries when cat_max_ratio < 1.
CROP_RETRIES = 10

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Options of the training chain. The config-backed fields are required: their values
    live in one place, `pne_jax.configs.common.data` (MMSegmentation's recipe), and
    `input_pipeline.train_augment(config)` builds this from `config.data`.

    base_size: MMSegmentation's `scale` (long and short edge, in either order); an image is
        rescaled to fit `base_size * ratio` keeping its aspect ratio.
    crop_size: (height, width) of the output; smaller rescaled images are padded to it.
    ratio_range: (low, high) of the uniform rescale ratio.
    cat_max_ratio: RandomCrop's largest share of one class in a crop (1: no retries).
    flip_prob: probability of a horizontal flip.
    photometric: whether PhotoMetricDistortion runs.
    ignore_index: the label of unlabelled pixels, also used for label padding.
    mean, std: the normalisation (ImageNet's, RGB, 0-255 scale).
    """

    base_size: Size
    crop_size: Size
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    flip_prob: float
    photometric: bool
    ignore_index: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        _check_size("base_size", self.base_size)
        _check_size("crop_size", self.crop_size)
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index must fit uint8 labels, got {self.ignore_index}")


def _check_size(name: str, size) -> None:
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"{name} must be two positive integers, got {size}")


def check_example(image: np.ndarray, label: np.ndarray | None = None) -> None:
    """Raises ValueError unless image is uint8 [H, W, 3] and label uint8 [H, W] of the same size."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label is None:
        return
    _check_label(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label size {label.shape} differs from image size {image.shape[:2]}")


def _check_label(label: np.ndarray) -> None:
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be uint8 [H, W], got {label.dtype} {label.shape}")


# --- Geometry -----------------------------------------------------------------------------------


def keep_ratio_size(size: Size, scale: Size) -> Size:
    """(h, w) of `size` rescaled to fit `scale` (long, short edge, any order) keeping its ratio.

    MMCV's `rescale_size`: factor = min(long / long side, short / short side), edges rounded.
    """
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def random_scale(
    rng: np.random.Generator, base_size: Size, ratio_range: tuple[float, float]
) -> Size:
    """`base_size` times a ratio drawn uniformly from `ratio_range`, truncated (RandomResize)."""
    ratio = rng.uniform(*ratio_range)
    return int(base_size[0] * ratio), int(base_size[1] * ratio)


def nearest_index(in_len: int, out_len: int, start: int = 0, count: int | None = None):
    """Source indices [count] of output pixels start..start+count when resizing in_len -> out_len.

    Half-pixel centres: output i reads input floor((i + 0.5) * in_len / out_len).
    """
    count = out_len - start if count is None else count
    pos = (np.arange(start, start + count, dtype=np.float64) + 0.5) * (in_len / out_len)
    return np.minimum(pos.astype(np.intp), in_len - 1)


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a label map [H, W] to size (h, w); values are only copied."""
    h, w = label.shape[:2]
    return label[np.ix_(nearest_index(h, size[0]), nearest_index(w, size[1]))]


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Bilinear resize of a uint8 image [H, W, 3] to size (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_window(image: np.ndarray, size: Size, window: tuple[int, int, int, int]) -> np.ndarray:
    """The window (y0, x0, h, w) of `image` resized to `size`, computing only that window."""
    y0, x0, h, w = window
    if image.shape[:2] == tuple(size):
        return image[y0 : y0 + h, x0 : x0 + w]
    sy, sx = image.shape[0] / size[0], image.shape[1] / size[1]
    box = (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, box=box))


def rescale(image: np.ndarray, label: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Resizes image (bilinear) and label (nearest) to size (h, w)."""
    check_example(image, label)
    return resize_image(image, size), resize_label(label, size)


def crop_is_balanced(
    label: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX
) -> bool:
    """MMSegmentation's test: >= 2 classes and none above cat_max_ratio of the labelled pixels."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _choose_crop(
    rng: np.random.Generator,
    size: Size,
    crop_size: Size,
    label_window: Callable[[int, int, int, int], np.ndarray],
    cat_max_ratio: float,
    ignore_index: int,
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A crop window (y0, x0, h, w) of an image of `size` and its label, as RandomCrop draws it.

    With cat_max_ratio < 1, up to CROP_RETRIES unbalanced windows are redrawn; the last draw is
    kept even if unbalanced.
    """
    h, w = min(crop_size[0], size[0]), min(crop_size[1], size[1])

    def draw():
        y0 = int(rng.integers(0, size[0] - h + 1))
        x0 = int(rng.integers(0, size[1] - w + 1))
        return (y0, x0, h, w)

    window = draw()
    crop = label_window(*window)
    if cat_max_ratio < 1:
        for _ in range(CROP_RETRIES):
            if crop_is_balanced(crop, cat_max_ratio, ignore_index):
                break
            window = draw()
            crop = label_window(*window)
    return window, crop


def random_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    crop_size: Size,
    cat_max_ratio: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of at most crop_size (h, w), retrying for a balanced label (see _choose_crop)."""
    check_example(image, label)

    def label_window(y0, x0, h, w):
        return label[y0 : y0 + h, x0 : x0 + w]

    (y0, x0, h, w), crop = _choose_crop(
        rng, label.shape, crop_size, label_window, cat_max_ratio, ignore_index
    )
    return image[y0 : y0 + h, x0 : x0 + w], crop


def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors image and label left-right."""
    return image[:, ::-1], label[:, ::-1]


def random_hflip(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """hflip with probability `prob` (one draw, as RandomFlip)."""
    return hflip(image, label) if rng.random() < prob else (image, label)


# --- Photometric distortion ---------------------------------------------------------------------


def _affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """uint8 [256] table of clip(x * alpha + beta, 0, 255), truncated like MMSeg's `convert`."""
    values = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(values, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotometricDraws:
    """The random parameters of one PhotometricDistortion; None where a step is skipped.

    brightness: beta added to every channel. contrast: alpha multiplying every channel, applied
    before saturation and hue, or last when `contrast_last`. saturation: the factor of PIL's S
    channel. hue: the shift in OpenCV's 2-degree units, an integer in [-hue_delta, hue_delta).
    """

    brightness: float | None
    contrast: float | None
    contrast_last: bool
    saturation: float | None
    hue: int | None


def photometric_draws(
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> PhotometricDraws:
    """PhotoMetricDistortion's draws, in MMSegmentation's order (see photometric_distortion)."""
    brightness = rng.uniform(-brightness_delta, brightness_delta) if rng.integers(2) else None
    contrast_last = bool(rng.integers(2) == 0)
    contrast = None
    if not contrast_last and rng.integers(2):
        contrast = rng.uniform(*contrast_range)
    saturation = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
    if contrast_last and rng.integers(2):
        contrast = rng.uniform(*contrast_range)
    return PhotometricDraws(brightness, contrast, contrast_last, saturation, hue)


def hue_steps(hue: int) -> int:
    """A hue shift in OpenCV's 2-degree units as PIL's 256 steps per turn (256 / 180 each).

    `round(x + hue * 256 / 180) == x + hue_steps(hue)` for integers x: 64 * hue / 45 is never
    an exact half, so rounding the shift once is rounding every table entry."""
    return int(np.round(hue * 256 / 180))


def apply_photometric(image: np.ndarray, draws: PhotometricDraws) -> np.ndarray:
    """PhotoMetricDistortion of a uint8 RGB image [H, W, 3] with the given draws.

    Every step clips to [0, 255] and truncates to uint8. Brightness and contrast are 256-entry
    tables, so they cost one lookup per pixel; saturation and hue go through PIL's 8-bit HSV
    (one round trip when either applies).
    """
    check_example(image)
    identity = np.arange(256, dtype=np.uint8)
    before = identity
    if draws.brightness is not None:
        before = _affine_lut(beta=draws.brightness)
    if draws.contrast is not None and not draws.contrast_last:
        before = _affine_lut(alpha=draws.contrast)[before]
    after = identity
    if draws.contrast is not None and draws.contrast_last:
        after = _affine_lut(alpha=draws.contrast)

    if before is not identity:
        image = before[image]
    if draws.saturation is not None or draws.hue is not None:
        saturation, hue = draws.saturation, draws.hue
        sat_lut = identity if saturation is None else _affine_lut(alpha=saturation)
        hue_lut = ((np.arange(256) + (0 if hue is None else hue_steps(hue))) % 256).astype(np.uint8)
        hsv = Image.fromarray(np.ascontiguousarray(image)).convert("HSV")
        hsv = hsv.point(np.concatenate([hue_lut, sat_lut, identity]).tolist())
        image = np.asarray(hsv.convert("RGB"))
    if after is not identity:
        image = after[image]
    return image


def photometric_distortion(
    rng: np.random.Generator,
    image: np.ndarray,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion of a uint8 RGB image [H, W, 3].

    In order, each with probability 1/2: brightness + U(-32, 32); then a coin picks whether
    contrast (x * U(0.5, 1.5)) comes second or last; saturation * U(0.5, 1.5); hue + an integer
    in [-18, 18) of OpenCV's 2-degree units. Every step clips to [0, 255] and truncates to uint8.
    `apply_photometric(image, photometric_draws(rng, ...))`.
    """
    check_example(image)
    draws = photometric_draws(rng, brightness_delta, contrast_range, saturation_range, hue_delta)
    return apply_photometric(image, draws)


# --- Normalisation and padding ------------------------------------------------------------------


def normalize(
    image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, flip: bool = False
) -> np.ndarray:
    """(image - mean) / std as float32 [H, W, 3]; `flip` mirrors it left-right in the same pass."""
    check_example(image)
    src = image[:, ::-1] if flip else image
    out = np.empty(image.shape, np.float32)
    np.subtract(src, np.asarray(mean, np.float32), out=out, dtype=np.float32)
    np.divide(out, np.asarray(std, np.float32), out=out)
    return out


def pad_to(array: np.ndarray, size: Size, value) -> np.ndarray:
    """Pads the bottom and right of `array` [h, w, ...] with `value` to size (H, W)."""
    h, w = array.shape[:2]
    if h > size[0] or w > size[1]:
        raise ValueError(f"cannot pad an array of size {(h, w)} to the smaller size {tuple(size)}")
    if (h, w) == tuple(size):
        return array
    out = np.full((size[0], size[1], *array.shape[2:]), value, array.dtype)
    out[:h, :w] = array
    return out


# --- Chains -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TrainDraws:
    """Everything random of one example of the training chain, and its final label.

    size: (h, w) of the rescaled image. window: (y0, x0, h, w), the crop in the rescaled image
    (h, w at most crop_size). flip: whether it is mirrored. photometric: the distortion's draws
    (None when `aug.photometric` is off). label: uint8 [ch, cw], cropped, flipped and padded to
    crop_size with ignore_index: `train_transform`'s label.
    """

    size: Size
    window: tuple[int, int, int, int]
    flip: bool
    photometric: PhotometricDraws | None
    label: np.ndarray


def train_draws(rng: np.random.Generator, label: np.ndarray, aug: TrainAugment) -> TrainDraws:
    """The training chain's draws for a label map [H, W] (uint8), in the chain's order: scale,
    crop window (retries read the label's window, resized by `nearest_index`), flip,
    photometric distortion. Only the label is resampled, so this is cheap."""
    _check_label(label)
    h, w = label.shape
    size = keep_ratio_size((h, w), random_scale(rng, aug.base_size, aug.ratio_range))

    def label_window(y0, x0, ch, cw):
        rows, cols = nearest_index(h, size[0], y0, ch), nearest_index(w, size[1], x0, cw)
        return label[np.ix_(rows, cols)]

    window, crop_label = _choose_crop(
        rng, size, aug.crop_size, label_window, aug.cat_max_ratio, aug.ignore_index
    )
    flip = bool(rng.random() < aug.flip_prob)
    photometric = photometric_draws(rng) if aug.photometric else None
    out_label = pad_to(crop_label[:, ::-1] if flip else crop_label, aug.crop_size, aug.ignore_index)
    return TrainDraws(size, window, flip, photometric, out_label)


def train_transform(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, aug: TrainAugment
) -> tuple[np.ndarray, np.ndarray]:
    """The full training chain: float32 image [ch, cw, 3] (pads 0) and uint8 label [ch, cw] (255).

    Same draws as random_scale -> keep_ratio_size -> rescale -> random_crop -> random_hflip ->
    photometric_distortion -> normalize -> pad_to, but resizes only the chosen window:
    `train_draws`, then the image's pixel work.
    """
    check_example(image, label)
    draws = train_draws(rng, label, aug)
    crop_image = resize_window(image, draws.size, draws.window)
    if draws.photometric is not None:
        crop_image = apply_photometric(crop_image, draws.photometric)
    normalized = normalize(crop_image, aug.mean, aug.std, flip=draws.flip)
    return pad_to(normalized, aug.crop_size, 0.0), draws.label


def eval_transform(
    image: np.ndarray, test_size: Size, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> np.ndarray:
    """Evaluation image, resized to fit test_size (ratio kept) and normalised: float32 [h, w, 3]."""
    check_example(image)
    return normalize(resize_image(image, keep_ratio_size(image.shape[:2], test_size)), mean, std)
