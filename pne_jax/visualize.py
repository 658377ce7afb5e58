"""Label maps as pictures: official palettes, colorize, overlay, side-by-side panels, legends.

The palettes are the published colour tables kept with the label tables in
`pne_jax/datasets/labels.py` (Cityscapes: cityscapesScripts' train-id colours; ADE20K and
COCO-Stuff-164k: MMSegmentation's dataset palettes) and the synthetic set's own; they need
only NumPy. All images are uint8 RGB `[H, W, 3]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pne_jax.datasets.labels import dataset_meta

IGNORE_INDEX = 255
RGB = tuple[int, int, int]


def palette(dataset_name: str) -> np.ndarray:
    """The colour of each train id of a dataset: uint8 [K, 3].

    `dataset_name` is a short name (`cityscapes`, `ade20k`, `coco_stuff164k`, `synthetic`)
    or a registered one (`cityscapes_semseg`, ...), e.g. `config.data.name`. ValueError
    listing the known names for any other (pass your own uint8 [K, 3] palette to `colorize`).
    """
    return _check_palette(np.asarray(dataset_meta(dataset_name).palette, np.int64))


def _check_palette(colours) -> np.ndarray:
    colours = np.asarray(colours)
    if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
        raise ValueError(f"palette must be [K, 3] RGB colours, got shape {colours.shape}")
    if np.issubdtype(colours.dtype, np.integer) and (colours.min() < 0 or colours.max() > 255):
        raise ValueError("palette colours must lie in [0, 255]")
    return colours.astype(np.uint8)


def colorize(
    label: np.ndarray,
    palette: np.ndarray,
    ignore_index: int | None = IGNORE_INDEX,
    ignore_color: RGB = (0, 0, 0),
) -> np.ndarray:
    """uint8 [H, W, 3]: pixel (y, x) gets `palette[label[y, x]]`, `ignore_color` where the label
    is `ignore_index` (None: no ignore value). Any other value outside [0, K) is a ValueError
    that names the values found and the palette size."""
    colours = _check_palette(palette)
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer map [H, W], got {label.dtype} {label.shape}")
    ignored = np.zeros(label.shape, bool) if ignore_index is None else label == ignore_index
    bad = ~ignored & ((label < 0) | (label >= len(colours)))
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"label values {shown} are outside the palette's {len(colours)} classes "
            f"[0, {len(colours)}) and are not the ignore index {ignore_index}"
        )
    out = colours[np.where(ignored, 0, label)]
    out[ignored] = np.asarray(ignore_color, np.uint8)
    return out


def overlay(image: np.ndarray, colored: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 blend `(1 - alpha) * image + alpha * colored`, rounded half up."""
    image, colored = np.asarray(image), np.asarray(colored)
    if image.shape != colored.shape or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image and colored must both be [H, W, 3], got {image.shape} and {colored.shape}"
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blend = (1 - alpha) * image.astype(np.float64) + alpha * colored.astype(np.float64)
    return np.clip(np.floor(blend + 0.5), 0, 255).astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def panel(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    gap: int = 4,
    background: RGB = (255, 255, 255),
) -> np.ndarray:
    """Images side by side (top-aligned, `gap` pixels apart), each with an optional caption
    above it: uint8 [H', W', 3]."""
    if not images:
        raise ValueError("panel needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    images = [np.asarray(im) for im in images]
    for im in images:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"panel images must be uint8 [H, W, 3], got {im.dtype} {im.shape}")
    top = 16 if captions else 0
    height = top + max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), background)
    draw, font, x = ImageDraw.Draw(canvas), _font(), 0
    for i, im in enumerate(images):
        canvas.paste(Image.fromarray(im), (x, top))
        if captions:
            draw.text((x + 2, 1), captions[i], fill=(0, 0, 0), font=font)
        x += im.shape[1] + gap
    return np.asarray(canvas)


def legend(
    class_names: Sequence[str],
    palette: np.ndarray,
    columns: int = 5,
    cell: tuple[int, int] = (16, 104),
) -> np.ndarray:
    """A key of colour swatches and class names in `columns` columns: uint8 [H, W, 3]."""
    colours = _check_palette(palette)
    if len(class_names) > len(colours):
        raise ValueError(f"{len(class_names)} class names but {len(colours)} palette colours")
    rows = -(-len(class_names) // columns)
    h, w = cell
    canvas = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, name in enumerate(class_names):
        y, x = (i // columns) * h, (i % columns) * w
        draw.rectangle((x + 1, y + 2, x + h - 3, y + h - 2), fill=tuple(int(c) for c in colours[i]))
        draw.text((x + h + 1, y + 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
