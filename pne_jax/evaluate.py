"""Evaluation: predictions at each label's original resolution, and mIoU over a split.

A run builds one `Evaluator` (its confusion step jitted once) and calls it for each
evaluation; `evaluate` is the one-off form. The confusion matrix and the count of labels
outside [0, C) stay on device during a pass; labels outside the classes raise after it.

Test modes follow MMSegmentation 0.13 (`config.eval`, see `pne_jax.configs.common.evaluation`):

- 'whole': the image, resized to the test scale (ratio kept) and padded, goes through the
  model; the logits are upsampled bilinearly to the padded input, cropped to the image's
  valid region and resized to the label's original size before the argmax.
- 'slide': windows of `crop_size` every `stride` over the test-scale image, as
  `slide_inference`: per axis max(H - crop + stride - 1, 0) // stride + 1 windows, the last
  ones moved back to end at the image's edge; overlapping logits are summed and divided by
  the number of windows covering each pixel, then cropped and resized as in 'whole'.
- `scales` and `flip` (`aug_test`): each scale (a ratio of the test scale) and, with flip,
  its horizontal mirror runs in the mode above; the softmax probabilities at the label's
  size are averaged before the argmax. One scale without flip is exactly 'whole'/'slide'.

Shapes stay static although images differ: a batch is padded to (Hp, Wp) with each
example's valid size in `image_size`. Crop and resize are per example, with logits
edge-replicated beyond the valid region (PyTorch's clamping at the border) and resampled
with a per-example scale. In slide mode the window grid is computed per example from its
valid size: windows beyond an example's grid get weight 0, the loop runs only as many
steps as the largest grid of the batch needs, `windows_per_step` windows per image at a
time, so memory beyond the logits accumulator does not grow with the image. Padding never
enters an average or the metric: padded label pixels are 255 and filler examples are
masked out.

Differences from MMSegmentation, none of which applies when every image has the test scale
(Cityscapes: 1024 x 2048): (1) other scales are resized on device from the test-scale
image (static shape round(Hp * ratio) x round(Wp * ratio)), MMSegmentation resizes the
original image (and rounds to uint8); (2) in a batch padded beyond an image, the model sees
that padding as context (zeros after normalisation) where MMSegmentation runs it on the
image alone; a slide window larger than the image is only cut to the padded size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from pne_jax import metrics
from pne_jax.augment import IGNORE_INDEX
from pne_jax.models.layers import resize

MODES = ("whole", "slide")


class EvalOptions(NamedTuple):
    """Test-time inference settings: the fields of `config.eval` that shape predictions.

    Every value comes from the config (`pne_jax.configs.common.evaluation` holds the
    defaults); the slide fields are None in whole mode, where nothing reads them.
    """

    mode: str  # "whole" or "slide"
    crop_size: tuple[int, int] | None  # (h, w) of a slide window
    stride: tuple[int, int] | None  # (h, w) between slide windows
    windows_per_step: int | None  # slide windows per image run through the model at once
    scales: tuple[float, ...]  # ratios of the test scale
    flip: bool  # also predict the horizontal mirror


# What `eval_config=None` means for library callers (e.g. `predict_batch` without a config):
# plain inference, the image as it comes, no test-time augmentation.
WHOLE_ONE_SCALE = EvalOptions("whole", None, None, None, (1.0,), False)


def _field(eval_config: Mapping[str, Any], name: str) -> Any:
    if name not in eval_config:
        raise ValueError(
            f"config.eval.{name} is missing; a complete config.eval comes from "
            "pne_jax.configs.common.evaluation(...)"
        )
    return eval_config[name]


def eval_options(eval_config: Mapping[str, Any] | EvalOptions | None) -> EvalOptions:
    """Validated `EvalOptions` from `config.eval` (None: `WHOLE_ONE_SCALE`; an EvalOptions
    passes through). A missing field is a ValueError naming it."""
    if eval_config is None:
        return WHOLE_ONE_SCALE
    if isinstance(eval_config, EvalOptions):
        return eval_config
    mode = _field(eval_config, "mode")
    if mode not in MODES:
        raise ValueError(f"config.eval.mode must be one of {MODES}, got {mode!r}")
    scales = tuple(float(s) for s in _field(eval_config, "scales"))
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"config.eval.scales must be positive ratios, got {scales}")
    flip = bool(_field(eval_config, "flip"))
    if mode == "whole":
        return EvalOptions(mode, None, None, None, scales, flip)
    crop, stride = _field(eval_config, "crop_size"), _field(eval_config, "stride")
    if crop is None or stride is None or len(crop) != 2 or len(stride) != 2:
        raise ValueError(
            f"slide mode needs config.eval.crop_size and stride as (h, w), got {crop}, {stride}"
        )
    crop, stride = tuple(int(c) for c in crop), tuple(int(s) for s in stride)
    if min(crop) < 1 or min(stride) < 1 or stride[0] > crop[0] or stride[1] > crop[1]:
        # A stride beyond the crop leaves pixels no window covers (MMSegmentation asserts).
        raise ValueError(
            f"config.eval.stride {stride} must be positive and at most crop_size {crop}"
        )
    per_step = _field(eval_config, "windows_per_step")
    if per_step is None or int(per_step) < 1:
        raise ValueError(f"config.eval.windows_per_step must be >= 1, got {per_step}")
    return EvalOptions(mode, crop, stride, int(per_step), scales, flip)


# --------------------------------------------------------------------------------------
# Per-example resampling and flipping of top-left valid regions


def _clamp_to(x: jax.Array, valid: jax.Array) -> jax.Array:
    """One example [H, W, C]: pixels beyond the top-left `valid` (h, w) region replaced by
    the region's edge (PyTorch's border clamping)."""
    valid = jnp.maximum(valid, 1)
    rows = jnp.minimum(jnp.arange(x.shape[0]), valid[0] - 1)
    cols = jnp.minimum(jnp.arange(x.shape[1]), valid[1] - 1)
    return x[rows][:, cols]


def _crop_resize(logits: jax.Array, valid: jax.Array, size: jax.Array, out_shape) -> jax.Array:
    """One example: logits [H, W, C] whose top-left `valid` (h, w) region is the image ->
    that region resized bilinearly (half-pixel centres) to `size` (h', w'), placed at the
    top left of an [*out_shape, C] array (the rest is filler)."""
    scale = size.astype(jnp.float32) / jnp.maximum(valid, 1).astype(jnp.float32)
    return jax.image.scale_and_translate(
        _clamp_to(logits, valid),
        (*out_shape, logits.shape[-1]),
        (0, 1),
        scale,
        jnp.zeros(2, jnp.float32),
        method="linear",
        antialias=False,
    )


def _scaled(n: int, ratio: float) -> int:
    return max(1, int(n * ratio + 0.5))


def rescale_images(
    image: jax.Array, image_size: jax.Array, ratio: float
) -> tuple[jax.Array, jax.Array]:
    """Each image's valid region resized by `ratio` (bilinear, no antialiasing, as cv2), at
    the top left of [b, round(Hp * ratio), round(Wp * ratio), 3] with zero padding, and
    the new valid sizes [b, 2]."""
    shape = tuple(_scaled(n, ratio) for n in image.shape[1:3])
    size = jnp.floor(image_size.astype(jnp.float32) * ratio + 0.5).astype(jnp.int32)
    size = jnp.clip(size, 1, jnp.array(shape, jnp.int32))

    def one(x, valid, new):
        out = _crop_resize(x, valid, new, shape)
        inside = (jnp.arange(shape[0])[:, None] < new[0]) & (jnp.arange(shape[1]) < new[1])
        return jnp.where(inside[..., None], out, 0).astype(x.dtype)

    return jax.vmap(one)(image, image_size, size), size


def flip_valid(x: jax.Array, width: jax.Array) -> jax.Array:
    """[b, H, W, ...]: each example's top-left region of `width` [b] columns mirrored
    horizontally; the columns beyond it (padding) stay where they are."""
    cols = jnp.arange(x.shape[2])

    def one(a, w):
        return a[:, jnp.where(cols < w, w - 1 - cols, cols)]

    return jax.vmap(one)(x, width)


# --------------------------------------------------------------------------------------
# Whole and slide inference at one scale -> logits at the input's (padded) resolution


def _model_logits(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    """[n, h, w, 3] -> float32 logits [n, h, w, C], upsampled to the input (encode_decode)."""
    logits = model.apply(variables, images, train=False)["logits"]
    return resize(logits.astype(jnp.float32), images.shape[1:3])


def _window_start(i: jax.Array, size: jax.Array, window: int, stride: int) -> jax.Array:
    """Start of window i along an axis of `size` valid pixels: i * stride, moved back to end
    at the edge (MMSegmentation: y2 = min(y1 + crop, H), y1 = max(y2 - crop, 0))."""
    return jnp.maximum(jnp.minimum(i * stride + window, size) - window, 0)


def slide_logits(
    apply: Callable[[jax.Array], jax.Array],
    image: jax.Array,
    image_size: jax.Array,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    windows_per_step: int,
) -> jax.Array:
    """MMSegmentation's slide_inference on padded images [b, H, W, 3] with valid sizes
    `image_size` [b, 2]: float32 logits [b, H, W, C], each pixel of the valid region the
    mean of the windows covering it (other pixels: filler). `apply` maps [n, h, w, 3]
    windows to logits [n, h, w, C]. Window k of an example is row k // gw, column k % gw of
    its own grid (gh x gw windows); `windows_per_step` of them run per loop step."""
    b, height, width = image.shape[:3]
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    win_h, win_w = min(crop_h, height), min(crop_w, width)  # static window shape
    size = jnp.maximum(image_size, 1)
    grid_h = jnp.maximum(size[:, 0] - crop_h + stride_h - 1, 0) // stride_h + 1  # [b]
    grid_w = jnp.maximum(size[:, 1] - crop_w + stride_w - 1, 0) // stride_w + 1
    max_h = max(height - crop_h + stride_h - 1, 0) // stride_h + 1  # static bounds
    max_w = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    per_step = max(1, min(int(windows_per_step), max_h * max_w))

    # Windows covering each pixel: (rows covering y) x (columns covering x).
    def coverage(size, grids, window, stride, max_grids, n):  # -> [b, n]
        i = jnp.arange(max_grids)
        starts = _window_start(i[None], size[:, None], window, stride)  # [b, G]
        pos = jnp.arange(n)[None, None]
        inside = (pos >= starts[..., None]) & (pos < starts[..., None] + window)
        return jnp.sum(inside & (i[None] < grids[:, None])[..., None], axis=1)

    count = (
        coverage(size[:, 0], grid_h, win_h, stride_h, max_h, height)[:, :, None]
        * coverage(size[:, 1], grid_w, win_w, stride_w, max_w, width)[:, None, :]
    )  # [b, H, W]

    def cut(x, y0, x0):
        return jax.lax.dynamic_slice(x, (y0, x0, 0), (win_h, win_w, x.shape[-1]))

    def add(acc, logits, y0, x0, weight):
        window = cut(acc, y0, x0) + jnp.where(weight, logits, 0.0)
        return jax.lax.dynamic_update_slice(acc, window, (y0, x0, 0))

    def body(step, acc):
        k = step * per_step + jnp.arange(per_step)[None]  # [1, P]: window k of each image
        y = _window_start(k // grid_w[:, None], size[:, :1], win_h, stride_h)  # [b, P]
        x = _window_start(k % grid_w[:, None], size[:, 1:], win_w, stride_w)
        weight = k < (grid_h * grid_w)[:, None]  # beyond this image's grid: ignored
        crops = jax.vmap(jax.vmap(cut, (None, 0, 0)))(image, y, x)  # [b, P, h, w, 3]
        logits = apply(crops.reshape(b * per_step, win_h, win_w, image.shape[-1]))
        logits = logits.reshape(b, per_step, win_h, win_w, -1)
        for p in range(per_step):  # in window order, as MMSegmentation sums them
            acc = jax.vmap(add)(acc, logits[:, p], y[:, p], x[:, p], weight[:, p])
        return acc

    num_classes = jax.eval_shape(apply, image[:1, :win_h, :win_w]).shape[-1]
    acc = jnp.zeros((b, height, width, num_classes), jnp.float32)
    steps = (jnp.max(grid_h * grid_w) + per_step - 1) // per_step
    acc = jax.lax.fori_loop(0, steps, body, acc)
    return acc / jnp.maximum(count, 1)[..., None].astype(jnp.float32)


# --------------------------------------------------------------------------------------
# Predictions of a batch


def _pass_logits(
    model: nn.Module,
    variables: Any,
    batch: Mapping[str, jax.Array],
    out_shape: tuple[int, int],
    options: EvalOptions,
) -> list[jax.Array]:
    """float32 logits [b, *out_shape, C] of each test-time pass (scale, flip) of `options`,
    each example at the top left at its label's original size."""
    out_shape = tuple(int(n) for n in out_shape)
    image, image_size, label_size = batch["image"], batch["image_size"], batch["label_size"]
    apply = functools.partial(_model_logits, model, variables)

    def logits_at(ratio: float, flip: bool) -> jax.Array:  # [b, *out_shape, C]
        x, size = (image, image_size) if ratio == 1.0 else rescale_images(image, image_size, ratio)
        if flip:
            x = flip_valid(x, size[:, 1])
        if options.mode == "slide":
            logits = slide_logits(
                apply, x, size, options.crop_size, options.stride, options.windows_per_step
            )
        else:
            logits = apply(x)
        logits = jax.vmap(functools.partial(_crop_resize, out_shape=out_shape))(
            logits, size, label_size
        )
        return flip_valid(logits, label_size[:, 1]) if flip else logits

    flips = (False, True) if options.flip else (False,)
    return [logits_at(ratio, flip) for ratio in options.scales for flip in flips]


def _mean_softmax(passes: list[jax.Array]) -> jax.Array:
    return sum(jax.nn.softmax(logits, axis=-1) for logits in passes) / len(passes)


def predict_batch(
    model: nn.Module,
    variables: Any,
    batch: Mapping[str, jax.Array],
    out_shape: tuple[int, int],
    eval_config: Mapping[str, Any] | EvalOptions | None = None,
) -> jax.Array:
    """int32 predictions [b, *out_shape] for an evaluation batch (`input_pipeline.eval_dataset`
    format: image, image_size, label_size), each at the top left at its label's original
    size, inferred as `eval_config` (`config.eval`; None: `WHOLE_ONE_SCALE`) says. Jittable."""
    passes = _pass_logits(model, variables, batch, out_shape, eval_options(eval_config))
    if len(passes) == 1:  # argmax of the logits == argmax of their softmax
        return jnp.argmax(passes[0], axis=-1).astype(jnp.int32)
    return jnp.argmax(_mean_softmax(passes), axis=-1).astype(jnp.int32)


def predict_probabilities(
    model: nn.Module,
    variables: Any,
    batch: Mapping[str, jax.Array],
    out_shape: tuple[int, int],
    eval_config: Mapping[str, Any] | EvalOptions | None = None,
) -> jax.Array:
    """float32 class probabilities [b, *out_shape, C], laid out as `predict_batch`'s
    predictions: the softmax of each test-time pass, averaged (with several passes, exactly
    the array whose argmax `predict_batch` returns). Jittable."""
    passes = _pass_logits(model, variables, batch, out_shape, eval_options(eval_config))
    return _mean_softmax(passes)


def _replicated_like(x: jax.Array) -> jax.sharding.Sharding | None:
    """The sharding of a total reduced over `x`: replicated over x's mesh (or its device);
    None for an uncommitted array, whose results stay uncommitted too."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if isinstance(sharding, SingleDeviceSharding) and x.committed:
        return sharding
    return None


def make_confusion_step(
    model: nn.Module,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    eval_config: Mapping[str, Any] | EvalOptions | None = None,
) -> Callable[..., metrics.Confusion]:
    """Jitted (variables, batch, total) -> total + this batch's counts (`metrics.Confusion`:
    the confusion matrix and the labels outside [0, C) that are not `ignore_index`).

    It compiles once per batch shape if `total` has the sharding the step returns: start
    from `metrics.Confusion.zeros(num_classes, sharding)` with the batch's mesh, replicated
    (as `Evaluator` does)."""
    options = eval_options(eval_config)  # a bad config fails here, before any data is read

    @jax.jit
    def step(variables, batch, total: metrics.Confusion) -> metrics.Confusion:
        label = batch["label"]
        pred = predict_batch(model, variables, batch, label.shape[1:3], options)
        label = jnp.where(batch["mask"][:, None, None], label, ignore_index)
        counts = metrics.confusion_matrix(pred, label, num_classes, ignore_index)
        outside = metrics.count_outside(label, num_classes, ignore_index)
        return metrics.accumulate(total, counts, outside)

    return step


class Evaluator:
    """mIoU and the other metrics (`metrics.segmentation_metrics`) of a model on an
    evaluation split, built once per run: the confusion step is jitted here and compiles
    once for all evaluations with equal batch shapes.

    `place` puts each host batch on device (e.g. `input_pipeline.to_global_array` with the
    mesh); inference follows `eval_config` (`config.eval`). The totals stay on device during
    a pass; after it, labels outside [0, num_classes) other than `ignore_index` raise a
    ValueError (a dataset whose classes do not match the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        place: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
        eval_config: Mapping[str, Any] | EvalOptions | None,
        class_names: Sequence[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names for num_classes={num_classes}; pass one "
                "name per class or none"
            )
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.place = place
        self.class_names = None if class_names is None else list(class_names)
        self.options = eval_options(eval_config)
        self.step = make_confusion_step(model, self.num_classes, self.ignore_index, self.options)

    def confusion(self, variables: Any, batches: Iterable[Mapping[str, Any]]) -> metrics.Confusion:
        """The totals of one pass over `batches`, on device (no host sync per batch)."""
        total = None
        for batch in batches:
            placed = self.place(batch)
            if total is None:  # the step's output sharding, so that it compiles once
                sharding = _replicated_like(placed["label"])
                total = metrics.Confusion.zeros(self.num_classes, sharding)
            total = self.step(variables, placed, total)
        return metrics.Confusion.zeros(self.num_classes) if total is None else total

    def __call__(self, variables: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Metrics of one pass over host `batches` (e.g. `input_pipeline.eval_iterator`)."""
        total = self.confusion(variables, batches)
        outside = metrics.outside_count(total)
        if outside:
            raise ValueError(
                f"labels outside [0, {self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}: {outside} pixels; does model.num_classes "
                "match the dataset?"
            )
        return metrics.segmentation_metrics(total, self.class_names)


def evaluate(
    model: nn.Module,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int,
    *,
    place: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
    eval_config: Mapping[str, Any] | EvalOptions | None,
    class_names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """One-off evaluation: `Evaluator(...)(variables, batches)`. To evaluate repeatedly (in
    training), build one `Evaluator`, which compiles once."""
    evaluator = Evaluator(
        model,
        num_classes,
        place=place,
        eval_config=eval_config,
        class_names=class_names,
        ignore_index=ignore_index,
    )
    return evaluator(variables, batches)
