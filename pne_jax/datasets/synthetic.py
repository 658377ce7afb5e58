"""A synthetic segmentation dataset generated in-process: `synthetic_semseg`.

No download; every image is a pure function of (seed, split, index), so two preparations with
the same config are byte-identical. Scenes are a sky above a horizon and 1-3 ground bands
(vegetation, road, water), with textured objects of random shapes and sizes on top:

  0 sky         smooth vertical blue gradient, faint clouds
  1 vegetation  green, blotchy, grainy          2 road   grey, fine grain, mottled
  3 water       blue-green horizontal ripples
  4 dotted      dark dots on orange             5 striped  red/white stripes, any angle
  6 checkered   purple/yellow checks, rotated   7 speckled dark speckles on tan
  8 car, 9 boat the same smooth, glossy, random-hue shapes: a car on a road band, a boat on
                a water band; only the context tells them apart.

Colours jitter per instance and per image, and every pixel gets noise, so classes are told
apart by texture and colour statistics, not by a single colour. Ignore (255): 1-2 px borders
around objects in about half of the images, and unlabelled noise blobs in about a third.

Default config (`seed0-train400-val100-128x256`): 400 train and 100 validation images of
128x256; preparing it takes a few seconds on 2 CPU cores (measured in tests/test_datasets.py).
Other sizes: `SyntheticConfig(num_train=..., num_validation=..., height=..., width=...,
seed=...)`, e.g. `pne_jax.datasets.prepare("synthetic", data_dir, num_train=1000)`.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from pne_jax.datasets.labels import IGNORE_INDEX, SYNTHETIC
from pne_jax.datasets.semseg import Example, SemSegBuilder, encode_png

SKY, VEGETATION, ROAD, WATER, DOTTED, STRIPED, CHECKERED, SPECKLED, CAR, BOAT = range(10)
_SPLIT_IDS = {"train": 0, "validation": 1}


class SyntheticConfig(tfds.core.BuilderConfig):
    """Split sizes, image size and seed; the config name spells them out."""

    def __init__(
        self,
        *,
        num_train: int = 400,
        num_validation: int = 100,
        height: int = 128,
        width: int = 256,
        seed: int = 0,
    ):
        if min(num_train, num_validation) < 1 or min(height, width) < 32:
            raise ValueError("synthetic_semseg needs >= 1 image per split and >= 32x32 pixels")
        self.num_train, self.num_validation = num_train, num_validation
        self.height, self.width, self.seed = height, width, seed
        name = f"seed{seed}-train{num_train}-val{num_validation}-{height}x{width}"
        super().__init__(name=name, description=f"{height}x{width} images, seed {seed}")


class SyntheticSemseg(SemSegBuilder):
    """Textured shapes on textured backgrounds, 10 classes + ignore; see the module docstring."""

    name = "synthetic_semseg"
    META = SYNTHETIC
    IMAGE_FORMAT = "png"
    DESCRIPTION = __doc__
    BUILDER_CONFIGS = [SyntheticConfig()]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        cfg = self.builder_config
        if self.expected_split_sizes is not None:  # the generator is exact: always check
            self.expected_split_sizes = {"train": cfg.num_train, "validation": cfg.num_validation}

    def list_items(self, manual_dir: str | None) -> dict[str, list[Any]]:
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "validation": cfg.num_validation}
        return {split: [(split, i) for i in range(n)] for split, n in counts.items()}

    def load_item(self, item: tuple[str, int]) -> Example:
        split, index = item
        cfg = self.builder_config
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
        image, label = render_scene(rng, cfg.height, cfg.width)
        return {"image": encode_png(image), "label": label, "name": f"{split}_{index:06d}"}


# --- scene rendering ---------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], sd: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, sd, 3), 0, 1).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform noise (several times cheaper than Gaussian)."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(12**0.5)


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize((w + 2 * cell, h + 2 * cell), Image.BILINEAR)
    return np.asarray(up)[cell : cell + h, cell : cell + w]


def _rotated(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _texture(
    cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, horizon: float
) -> np.ndarray:
    """An [H, W, 3] float texture of class `cls` (values about in [0, 1])."""
    h, w = yy.shape
    grain = _noise(rng, (h, w, 1))
    if cls == SKY:
        top, bottom = _jitter(rng, (0.30, 0.50, 0.85), 0.05), _jitter(rng, (0.70, 0.80, 0.92), 0.04)
        t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
        clouds = np.clip(_smooth(rng, h, w, 24), 0, 1)[..., None] * rng.uniform(0, 0.35)
        return top * (1 - t) + bottom * t + clouds + 0.015 * grain
    if cls == VEGETATION:
        blotch = 0.75 + 0.35 * _smooth(rng, h, w, 6)[..., None]
        return _jitter(rng, (0.22, 0.48, 0.16), 0.05) * blotch + 0.07 * grain
    if cls == ROAD:
        grey = _jitter(rng, (0.42, 0.42, 0.45), 0.06)
        return grey + 0.05 * _smooth(rng, h, w, 16)[..., None] + 0.04 * grain
    if cls == WATER:
        f1, f2, phase = rng.uniform(0.5, 1.1), rng.uniform(0.03, 0.08), rng.uniform(0, 6.3)
        ripple = np.sin(yy * f1 + 2.5 * np.sin(xx * f2 + phase))[..., None]
        return _jitter(rng, (0.10, 0.38, 0.55), 0.05) + 0.07 * ripple + 0.03 * grain
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi))
    if cls == DOTTED:
        p = rng.uniform(5, 9)
        r2 = rng.uniform(1.5, p / 3) ** 2
        dots = (((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < r2)[..., None]
        base, ink = _jitter(rng, (0.92, 0.55, 0.15), 0.06), _jitter(rng, (0.30, 0.15, 0.05), 0.05)
        return np.where(dots, ink, base) + 0.04 * grain
    if cls == STRIPED:
        p = rng.uniform(4, 10)
        on = ((u % p) < p / 2)[..., None]
        a, b = _jitter(rng, (0.82, 0.15, 0.15), 0.06), _jitter(rng, (0.92, 0.90, 0.88), 0.04)
        return np.where(on, a, b) + 0.04 * grain
    if cls == CHECKERED:
        c = rng.uniform(3, 7)
        on = ((np.floor(u / c) + np.floor(v / c)) % 2 == 0)[..., None]
        a, b = _jitter(rng, (0.50, 0.20, 0.62), 0.06), _jitter(rng, (0.90, 0.85, 0.30), 0.06)
        return np.where(on, a, b) + 0.04 * grain
    if cls == SPECKLED:
        specks = (rng.random((h, w, 1)) < rng.uniform(0.08, 0.2)).astype(np.float32)
        base, ink = _jitter(rng, (0.76, 0.66, 0.46), 0.05), _jitter(rng, (0.25, 0.20, 0.15), 0.04)
        return base * (1 - specks) + ink * specks + 0.03 * grain
    # CAR / BOAT: glossy smooth shape of a random hue, shaded left to right.
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 0.9), rng.uniform(0.5, 0.9))
    shade = (u - u.mean()) / (np.ptp(u) + 1e-6) * rng.uniform(0.1, 0.35)
    return np.asarray(rgb, np.float32) + shade[..., None] + 0.02 * grain


def _shape_mask(
    rng: np.random.Generator, h: int, w: int, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    """A random ellipse, rotated rectangle, triangle or star-convex blob, as a bool mask."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = rng.integers(4)
    if kind == 0:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
        return np.asarray(canvas, bool)
    if kind == 1:  # rectangle (rotated, then stretched)
        angles, radii = np.arange(4) * np.pi / 2 + np.pi / 4, np.ones(4)
    elif kind == 2:  # triangle
        angles, radii = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.4, 0.4, 3), np.ones(3)
    else:  # star-convex blob
        n = int(rng.integers(7, 13))
        angles, radii = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(0.55, 1.0, n)
    angles = angles + rng.uniform(0, np.pi)
    xs, ys = cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)
    draw.polygon(list(zip(xs, ys, strict=True)), fill=1)
    return np.asarray(canvas, bool)


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 image [h, w, 3] and uint8 label [h, w] (train ids, 255 = ignore)."""
    yy, xx = np.indices((h, w), dtype=np.float32)
    horizon0 = rng.uniform(0.2, 0.45) * h
    amplitude, frequency, phase = rng.uniform(0, 4), rng.uniform(0.02, 0.08), rng.uniform(0, 6.3)
    below = yy >= horizon0 + amplitude * np.sin(xx * frequency + phase)

    # Ground bands separated by wavy vertical boundaries; neighbours differ.
    n_bands = int(rng.integers(1, 4))
    cuts = np.sort(rng.uniform(0.15, 0.85, n_bands - 1)) * w
    wobble = rng.uniform(0, 8) * np.sin(yy * rng.uniform(0.05, 0.15) + rng.uniform(0, 6.3))
    band_of = (xx[None] + wobble[None] > cuts[:, None, None]).sum(0)
    classes = [int(rng.choice([VEGETATION, ROAD, WATER]))]
    for _ in range(n_bands - 1):
        classes.append(int(rng.choice([c for c in (VEGETATION, ROAD, WATER) if c != classes[-1]])))
    ground = np.asarray(classes, np.uint8)[band_of]

    label = np.where(below, ground, SKY).astype(np.uint8)
    image = _texture(SKY, rng, yy, xx, horizon0)
    for cls in sorted(set(classes)):
        np.copyto(image, _texture(cls, rng, yy, xx, horizon0), where=(label == cls)[..., None])

    # Objects, painted in random order; `instance` remembers who is where, for the borders.
    instance = np.zeros((h, w), np.int32)
    objects: list[tuple[int, float, float, float, float]] = []
    for _ in range(int(rng.integers(2, 7))):  # textured objects, anywhere
        cls = int(rng.integers(DOTTED, SPECKLED + 1))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.07, 0.25) * h * rng.uniform(0.6, 1.4, 2)
        objects.append((cls, cy, cx, ry, rx))
    for _ in range(int(rng.integers(1, 5))):  # vehicles sit on a road or water band
        cy = rng.uniform(horizon0 + 0.1 * h, h)
        cx = rng.uniform(0, w)
        under = ground[min(int(cy), h - 1), min(int(cx), w - 1)]
        if under in (ROAD, WATER):
            r = rng.uniform(0.06, 0.16) * h
            objects.append((CAR if under == ROAD else BOAT, cy - 0.5 * r, cx, 0.6 * r, 1.6 * r))
    if rng.random() < 0.33:  # unlabelled blobs: noise, ignore
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(0.04, 0.12) * h
            objects.append((IGNORE_INDEX, rng.uniform(0, h), rng.uniform(0, w), r, r))
    for k in rng.permutation(len(objects)):
        cls, cy, cx, ry, rx = objects[k]
        mask = _shape_mask(rng, h, w, cy, cx, ry, rx)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inside = mask[box]
        if cls == IGNORE_INDEX:
            tex = rng.uniform(0, 1, (*inside.shape, 3)).astype(np.float32)
        else:
            tex = _texture(cls, rng, yy[box], xx[box], horizon0)
        np.copyto(image[box], tex, where=inside[..., None])
        label[mask] = cls
        instance[mask] = k + 1

    if rng.random() < 0.5:  # thin ignore borders around objects (1 or 2 px)
        edge = np.zeros((h, w), bool)
        dy = instance[1:, :] != instance[:-1, :]
        dx = instance[:, 1:] != instance[:, :-1]
        edge[1:, :] |= dy
        edge[:, 1:] |= dx
        if rng.random() < 0.5:
            edge[:-1, :] |= dy
            edge[:, :-1] |= dx
        label[edge] = IGNORE_INDEX

    gain, bias = rng.uniform(0.75, 1.2), rng.uniform(-0.06, 0.06)
    image = image * gain + bias + 0.03 * _noise(rng, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label
