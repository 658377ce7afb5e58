"""`Segmenter`: a trained model for applications, images in and label maps out.

    from pne_jax import Segmenter

    segmenter = Segmenter.from_workdir("runs/demo")      # the latest checkpoint, its config
    labels = segmenter.segment(["a.jpg", "b.png"])       # int32 [H, W] each, at its own size
    probs = segmenter.probabilities("a.jpg")             # float32 [H, W, C]
    shown = segmenter.overlay("a.jpg", labels[0])        # the dataset's palette on the image

An image is a uint8 [H, W, 3] NumPy array, a PIL image or a file path (a 4-D array is a
list of images). The uint8 images go to the device, where the evaluation's preprocessing
runs (`pne_jax.preprocess`: resized to fit `config.data.test_size`, ratio kept, normalised;
equal to the host's `augment.eval_transform` to one level of 255 in a few pixels), then the
config's test mode (`config.eval`: whole or slide, scales, flip; each can be changed per
call) by `evaluate.predict_batch`; each image is predicted at its original size. The same
function (`Segmenter.function`) is what `pne_jax.export` exports.

Compilations. Images are batched by program: an image is padded at the bottom and right to
its bucket, the next size of `size_bucket`'s ladder per side (32, 48, 64, 96, 128, ...: two
sizes per octave, so at most 1.5x per side), and its resized image to its canvas, the
ladder size of the resized size. One compilation serves each (bucket, canvas, batch size,
test mode), so a call compiles at most once per (bucket, canvas) its images fall in, and a
stream of calls at most once per (bucket, canvas) and batch size (a Cityscapes stream of
1024 x 2048 images: one). The images of a program go in batches of `batch_size` (default
`config.eval.global_batch_size`), or of the smallest power of two that holds them all when
that is smaller (one image: a batch of one), the last batch completed with masked fillers,
each sharded over the local devices that divide it. In whole mode the padding of the canvas
is context for the model, as in evaluation (`pne_jax.evaluate`, difference 2);
`size_buckets=False` pads nothing: each image is then predicted exactly as alone, at one
compilation per distinct size.

Other inputs: greyscale and 16-bit arrays (high byte, the rule of `datasets.images`) are
converted with a logged note, alpha is dropped; float and other arrays are refused with what
was received.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from pne_jax import evaluate, input_pipeline, preprocess, visualize
from pne_jax.datasets import labels
from pne_jax.datasets.images import UnsupportedImageError, to_rgb
from pne_jax.models import build_model

ImageLike = np.ndarray | Image.Image | str | os.PathLike
SMALLEST_BUCKET = 32


def size_bucket(n: int) -> int:
    """The smallest size of the ladder 32, 48, 64, 96, 128, 192, ... (2^k and 3 * 2^(k-1))
    that holds `n` pixels."""
    if n <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    power = 1 << (n - 1).bit_length()  # the smallest power of two >= n
    return 3 * power // 4 if n <= 3 * power // 4 else power


def as_rgb(image: ImageLike, where: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a file path, a PIL image (`datasets.images.to_rgb`'s rule) or an
    array: uint8 or uint16 (its high byte), [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha
    dropped), converted with a logged note; anything else is an `UnsupportedImageError`."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            opened.load()
            return to_rgb(opened, where=os.fspath(image))
    if isinstance(image, Image.Image):
        return to_rgb(image, where=where)
    array = np.asarray(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
        return array
    channels = array.shape[-1] if array.ndim == 3 else 1
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3) or channels == 2:
        raise UnsupportedImageError(
            f"{where}: got a {array.dtype} array of shape {array.shape}; expected uint8 "
            "[H, W, 3] RGB (or uint8/uint16 [H, W], [H, W, 1], [H, W, 4]): scale float "
            "images to 0..255 and convert them with .astype(np.uint8)"
        )
    notes = []
    if array.dtype == np.uint16:
        array, notes = (array >> 8).astype(np.uint8), ["16-bit: kept the high byte"]
    if channels == 4:
        array, notes = array[..., :3], [*notes, "alpha dropped"]
    elif channels == 1:
        grey = array.reshape(array.shape[:2])
        array, notes = np.stack([grey] * 3, axis=-1), [*notes, "greyscale copied to RGB"]
    if notes:
        logging.warning("%s (%s %s): %s", where, image.dtype, image.shape, ", ".join(notes))
    return np.ascontiguousarray(array)


def host_batch(images: list[np.ndarray], size: int, bucket: tuple[int, int]):
    """uint8 [size, *bucket, 3] with each image at the top left (zeros elsewhere, and in
    the filler rows), and int32 sizes [size, 2] (fillers: 1 x 1)."""
    batch = np.zeros((size, *bucket, 3), np.uint8)
    sizes = np.ones((size, 2), np.int32)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        batch[i, :h, :w], sizes[i] = image, (h, w)
    return batch, sizes


def group_batch_size(batch_size: int, n: int) -> int:
    """The batch size for n images of one bucket: `batch_size`, or the smallest power of two
    that holds them all when that is smaller (one image: 1)."""
    return min(batch_size, 1 << (n - 1).bit_length())


class Segmenter:
    """Images in, label maps (or probabilities) at their original size out; see the module
    docstring. `variables` are the model's {"params", "batch_stats"}."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: Any,
        *,
        batch_size: int | None = None,
        size_buckets: bool = True,
    ):
        self.config = config
        self.model = build_model(config.model)
        self.num_classes = int(config.model.num_classes)
        self.test_size = tuple(input_pipeline.data_field(config, "test_size"))
        if batch_size is None:
            batch_size = input_pipeline.eval_global_batch_size(config)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.size_buckets = int(batch_size), bool(size_buckets)
        self.eval_config = dict(config.get("eval", {}))
        evaluate.eval_options(self.eval_config)  # a bad config.eval is an error now
        self.variables = variables
        self._placed: dict[int, tuple[NamedSharding, Any]] = {}
        self._compiled: dict[tuple, Any] = {}

    # ----------------------------------------------------------------------------------
    # Construction from a run or a checkpoint

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, **kwargs: Any) -> Segmenter:
        """The model of checkpoint `step` (default: the latest) of a training workdir, with
        the config it was trained with (saved in the checkpoint)."""
        from pne_jax import checkpoint, train

        directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not os.path.isdir(directory) or not os.listdir(directory):
            raise FileNotFoundError(
                f"no checkpoints in {directory}: pass the workdir of a trained run "
                "(pne-jax train --config=... --workdir=...)"
            )
        ckpt = checkpoint.Checkpointer(directory, asynchronous=False)
        try:
            steps = ckpt.all_steps()
            step = ckpt.latest_step() if step is None else int(step)
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint of step {step} in {directory}; saved steps: {sorted(steps)}"
                )
            config = ml_collections.ConfigDict(_tuples(ckpt.saved_config(step)))
            variables = train.restore_model_variables(ckpt, config, step)
        finally:
            ckpt.close()
        return cls(config, variables, **kwargs)

    @classmethod
    def from_checkpoint(cls, config: ml_collections.ConfigDict, path: str, **kwargs: Any):
        """The model `config` builds, with the weights at `path`: a workdir (its latest
        checkpoint), a step of one (`<workdir>/checkpoints/<step>`), or a whole model's
        weights file (`.safetensors`, `.npz`, a converted or MMSegmentation `.pth`, as
        `config.model.init_from` reads). Weights of another model are refused, naming the
        parameters that differ."""
        from pne_jax import train

        path = os.fspath(path)
        parent, name = os.path.split(os.path.abspath(path))
        if os.path.isdir(path) and os.path.basename(parent) == "checkpoints" and name.isdigit():
            variables, _ = train.load_variables(config, os.path.dirname(parent), int(name))
        elif os.path.isdir(path):
            variables, _ = train.load_variables(config, path)
        else:
            config = ml_collections.ConfigDict(config.to_dict())
            config.model.init_from = path
            variables = train.whole_model_variables(config)
        return cls(config, variables, **kwargs)

    # ----------------------------------------------------------------------------------
    # Inference

    def segment(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        mode: str | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """int32 label map [H, W] of each image, at its original size (one image in: one
        map out; a list in: a list out). `mode`, `scales`, `flip` override `config.eval`."""
        return self._run(images, "labels", mode=mode, scales=scales, flip=flip)

    def probabilities(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        mode: str | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """float32 class probabilities [H, W, C] of each image (`segment`'s argmax is theirs):
        the softmax, averaged over the test-time passes."""
        return self._run(images, "probabilities", mode=mode, scales=scales, flip=flip)

    @property
    def compilations(self) -> int:
        """Programs compiled so far (one per bucket, canvas, batch size, test mode, output)."""
        return len(self._compiled)

    def _run(self, images, kind: str, **overrides) -> np.ndarray | list[np.ndarray]:
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim != 4
        )
        listed = [images] if single else list(images)  # a 4-D array: a list of images
        options = self.options(**overrides)
        prepared = [self._prepare(image, i) for i, image in enumerate(listed)]
        results: list[np.ndarray | None] = [None] * len(listed)
        pending = None  # the previous batch: read back while the device runs the next
        for size, bucket, canvas, chosen in self.batches([p.shape[:2] for p in prepared]):
            program = self._program(kind, options, size, bucket, canvas)
            outputs = program(*host_batch([prepared[i] for i in chosen], size, bucket))
            if pending is not None:
                self._collect(results, prepared, *pending)
            pending = (chosen, outputs)
        if pending is not None:
            self._collect(results, prepared, *pending)
        return results[0] if single else results

    def batches(self, sizes: Sequence[tuple[int, int]]):
        """The batches images of `sizes` (h, w) are predicted in, in order: (batch size,
        bucket, canvas, indices of the images), grouped by `program_of`."""
        groups: dict[tuple, list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(self.program_of(size), []).append(i)
        for (bucket, canvas), members in groups.items():
            size = group_batch_size(self.batch_size, len(members))
            for start in range(0, len(members), size):
                yield size, bucket, canvas, members[start : start + size]

    def options(self, mode=None, scales=None, flip=None) -> evaluate.EvalOptions:
        """The test mode of `config.eval` with `mode`, `scales`, `flip` changed where given."""
        asked = {"mode": mode, "scales": scales, "flip": flip}
        eval_config = dict(self.eval_config, **{k: v for k, v in asked.items() if v is not None})
        return evaluate.eval_options(eval_config)

    def _prepare(self, image: ImageLike, index: int) -> np.ndarray:
        rgb = as_rgb(image, where=f"image {index}")
        if min(rgb.shape[:2]) < 1:
            raise UnsupportedImageError(f"image {index} is empty: shape {rgb.shape}")
        if max(rgb.shape[:2]) > preprocess.LARGEST_SIDE:
            raise UnsupportedImageError(
                f"image {index} of shape {rgb.shape} is larger than "
                f"{preprocess.LARGEST_SIDE} pixels a side: resize it first"
            )
        return rgb

    def program_of(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket, canvas) of an image of `size` (h, w): the shape it is padded to and
        predicted at, and the shape its resized image (`preprocess.resized_size`) is padded
        to, each the next size of `size_bucket`'s ladder (the sizes themselves with
        `size_buckets=False`). One program serves each."""
        resized = preprocess.resized_size(size, self.test_size)
        if not self.size_buckets:
            return tuple(size), resized
        return tuple(map(size_bucket, size)), tuple(map(size_bucket, resized))

    def function(self, kind: str, options: evaluate.EvalOptions, bucket, canvas):
        """The pure prediction function of one (bucket, canvas) program: (variables, uint8
        images [b, *bucket, 3] with each image at the top left, int32 sizes [b, 2]) ->
        int32 labels [b, *bucket] (kind "labels") or float32 probabilities [b, *bucket, C]
        ("probabilities"), each image's at its top left. The device-side preprocessing
        (`preprocess.eval_batch`) and `evaluate.predict_batch`; `pne_jax.export` exports it."""
        infer = evaluate.predict_batch if kind == "labels" else evaluate.predict_probabilities
        model, test_size = self.model, self.test_size
        bucket, canvas = tuple(map(int, bucket)), tuple(map(int, canvas))

        def predict(variables, images, sizes):
            batch = preprocess.eval_batch(images, sizes, test_size, canvas)
            return infer(model, variables, batch, bucket, options)

        return predict

    def _program(self, kind: str, options: evaluate.EvalOptions, size: int, bucket, canvas):
        """`function`, jitted for batches of `size`, placed on the local devices that
        divide the batch."""
        key = (kind, options, size, bucket, canvas)
        if key not in self._compiled:
            sharding, variables = self._placement(size)
            jitted = jax.jit(self.function(kind, options, bucket, canvas), out_shardings=sharding)

            def run(images, sizes, jitted=jitted, variables=variables, sharding=sharding):
                images, sizes = jax.device_put((images, sizes), sharding)
                return jitted(variables, images, sizes)

            self._compiled[key] = run
        return self._compiled[key]

    def _placement(self, size: int) -> tuple[NamedSharding, Any]:
        devices = jax.local_devices()
        count = math.gcd(size, len(devices))
        if count not in self._placed:
            mesh = Mesh(np.array(devices[:count]), ("data",))
            variables = jax.device_put(self.variables, NamedSharding(mesh, P()))
            self._placed[count] = (NamedSharding(mesh, P("data")), variables)
        return self._placed[count]

    @staticmethod
    def _collect(results: list, prepared: list[np.ndarray], chosen: list[int], outputs) -> None:
        outputs = np.asarray(outputs)
        for row, i in enumerate(chosen):
            h, w = prepared[i].shape[:2]
            results[i] = np.ascontiguousarray(outputs[row, :h, :w])

    # ----------------------------------------------------------------------------------
    # Showing results

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names (None for a dataset pne-jax does not know)."""
        return labels.class_names_for(self.config.data.name, self.num_classes)

    @property
    def palette(self) -> np.ndarray:
        """uint8 [K, 3]: the colour of each class (the dataset's; ValueError if unknown)."""
        return visualize.palette(self.config.data.name)

    def colorize(self, label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
        """uint8 [H, W, 3]: each pixel coloured by its class (`palette`: the dataset's)."""
        colours = self.palette if palette is None else palette
        return visualize.colorize(label, colours, ignore_index=None)

    def overlay(
        self,
        image: ImageLike,
        label: np.ndarray,
        alpha: float = 0.5,
        palette: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 [H, W, 3]: the colorized `label` blended over `image`."""
        return visualize.overlay(as_rgb(image), self.colorize(label, palette), alpha)


def _tuples(tree: Any) -> Any:
    """A config read from JSON with its lists back as tuples (sizes are (h, w) pairs)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
