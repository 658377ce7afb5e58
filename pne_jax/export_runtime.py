"""Runs a model exported by `pne-jax export` with jax and NumPy alone (no pne-jax).

The export copies this file into the artifact as `pne_exported.py`:

    import sys; sys.path.insert(0, "exported")
    import pne_exported

    model = pne_exported.load("exported")
    labels = model.segment(image)            # uint8 [H, W, 3] -> int32 [H, W]
    labels = model.segment([a, b, c])        # a list of any sizes -> a list
    model.classes, model.palette             # what the labels mean and how to draw them

Each image is padded into the program of its (bucket, canvas): the next size of the ladder
32, 48, 64, 96, 128, ... per side of the image and of its size resized to fit the test size.
One program runs any number of images (a symbolic batch). The rules here are pne-jax's
(`pne_jax.segmenter.Segmenter.program_of`, `pne_jax.preprocess.keep_ratio_sizes`), restated so
that this file needs nothing of pne-jax; tests/test_export.py holds them equal.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax import export as jax_export

MANIFEST = "pne_export.json"
FORMAT_VERSION = 1
LARGEST_SIDE = 16384
LADDER = np.array(
    sorted({2**k for k in range(5, 15)} | {3 * 2 ** (k - 1) for k in range(5, 15)}), np.int64
)


def size_bucket(n: int) -> int:
    """The smallest size of the ladder that holds n pixels."""
    return int(LADDER[np.searchsorted(LADDER, n)])


def resized_size(size: tuple[int, int], test_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) resized to fit test_size (long, short edge, any order) keeping the ratio;
    exact integer arithmetic, halves rounded up."""
    h, w = (max(int(n), 1) for n in size)
    long_edge, short_edge = max(test_size), min(test_size)
    longer, shorter = max(h, w), min(h, w)
    num, den = (
        (long_edge, longer)
        if long_edge * shorter <= short_edge * longer
        else (
            short_edge,
            shorter,
        )
    )
    return max((2 * h * num + den) // (2 * den), 1), max((2 * w * num + den) // (2 * den), 1)


class ExportedSegmenter:
    """The exported programs of one directory, their weights and their manifest."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass the folder `pne-jax export` wrote")
        with open(path) as f:
            self.manifest = json.load(f)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: export format {version}, this loader reads {FORMAT_VERSION}: "
                "use the pne_exported.py of the same folder"
            )
        self.classes = list(self.manifest["classes"])
        self.palette = np.array(self.manifest["palette"], np.uint8)
        self.test_size = tuple(self.manifest["input"]["test_size"])
        self.size_buckets = bool(self.manifest["input"]["size_buckets"])
        self.programs = {
            (tuple(p["bucket"]), tuple(p["canvas"])): p["file"]
            for p in self.manifest["stablehlo"]["programs"]
        }
        with np.load(os.path.join(self.directory, self.manifest["stablehlo"]["weights"])) as w:
            self._weights = [jax.device_put(w[str(i)]) for i in range(len(w.files))]
        self._loaded: dict[tuple, jax_export.Exported] = {}

    def program_of(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket, canvas) of an image of `size` (h, w)."""
        resized = resized_size(size, self.test_size)
        if not self.size_buckets:
            return tuple(size), resized
        return (size_bucket(size[0]), size_bucket(size[1])), tuple(map(size_bucket, resized))

    def _program(self, key) -> jax_export.Exported:
        if key not in self.programs:
            (bh, bw), _ = key
            known = ", ".join(f"{b[0]}x{b[1]} (canvas {c[0]}x{c[1]})" for b, c in self.programs)
            raise ValueError(
                f"no exported program for images up to {bh}x{bw} with this aspect (bucket "
                f"{key[0]}, canvas {key[1]}); exported: {known}. Export again with this size "
                "in --sizes"
            )
        if key not in self._loaded:
            with open(os.path.join(self.directory, self.programs[key]), "rb") as f:
                exported = jax_export.deserialize(bytearray(f.read()))
            backend = jax.default_backend()
            platform = {"gpu": "cuda"}.get(backend, backend)
            if platform not in exported.platforms:
                raise ValueError(
                    f"exported for {', '.join(exported.platforms)}, but jax runs on {platform}: "
                    f"export again with --platforms={platform}"
                )
            self._loaded[key] = exported
        return self._loaded[key]

    def segment(self, images):
        """int32 label map [H, W] of each uint8 RGB image [H, W, 3] (one in: one out; a list
        in: a list out)."""
        single = isinstance(images, np.ndarray) and images.ndim != 4
        listed = [images] if single else list(images)
        for i, image in enumerate(listed):
            _check(image, i)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(listed):
            groups.setdefault(self.program_of(image.shape[:2]), []).append(i)
        results = [None] * len(listed)
        for key, members in groups.items():
            program = self._program(key)
            batch = np.zeros((len(members), *key[0], 3), np.uint8)
            sizes = np.array([listed[i].shape[:2] for i in members], np.int32)
            for row, i in enumerate(members):
                batch[row, : sizes[row, 0], : sizes[row, 1]] = listed[i]
            labels = np.asarray(program.call(self._weights, batch, sizes))
            for row, i in enumerate(members):
                results[i] = labels[row, : sizes[row, 0], : sizes[row, 1]]
        return results[0] if single else results

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3]: each pixel in its class's colour."""
        return self.palette[labels]


def _check(image, index: int) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: expected a NumPy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image {index}: expected uint8 [H, W, 3] RGB, got a {image.dtype} array of shape "
            f"{image.shape} (convert with .astype(np.uint8) after scaling to 0..255, and "
            "greyscale with np.repeat(x[..., None], 3, -1))"
        )
    if min(image.shape[:2]) < 1 or max(image.shape[:2]) > LARGEST_SIDE:
        raise ValueError(
            f"image {index}: size {image.shape[:2]} is outside 1..{LARGEST_SIDE} pixels a side"
        )


def load(directory: str) -> ExportedSegmenter:
    """The exported model in `directory`."""
    return ExportedSegmenter(directory)
