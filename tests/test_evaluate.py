"""Inference modes (whole, slide, multi-scale + flip) against plain NumPy and closed forms,
sharded accumulation, and slide mode's memory bound. Tiny models, small images."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pne_jax import configs, evaluate, input_pipeline, metrics
from pne_jax.configs import common
from pne_jax.models.layers import resize
from tests.compile_count import COMPILES

C = 3


class TinyNet(nn.Module):
    """A strided 3x3 conv and a 1x1 classifier: logits at half resolution, so window borders
    and the upsampling both matter."""

    features: int = 8
    num_classes: int = C

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Conv(self.features, (3, 3), strides=2)(x))
        return {"logits": nn.Conv(self.num_classes, (1, 1))(h)}


class MirrorNet(nn.Module):
    """Equivariant to a horizontal flip by construction: one bias-free 3x3 conv whose kernel
    columns are [k0, k1, k0], then pointwise layers. With zero padding beyond an image,
    flipping its valid region flips the logits there."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        half = self.param("half", nn.initializers.normal(1.0), (3, 2, x.shape[-1], 8))
        kernel = jnp.concatenate([half, half[:, :1]], axis=1)
        h = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return {"logits": nn.Dense(C)(nn.relu(h))}


PAD = (20, 36)
SIZES = np.array([[20, 36], [15, 23], [12, 16], [17, 30]], np.int32)  # valid (h, w) per image


def _batch(seed=0, sizes=SIZES, pad=PAD, label_pad=(24, 40)):
    """An eval batch (input_pipeline format): images of `sizes` at the top left of `pad`,
    labels at other sizes (so predictions are resized) inside `label_pad`."""
    rng = np.random.default_rng(seed)
    b = len(sizes)
    image = np.zeros((b, *pad, 3), np.float32)
    label = np.full((b, *label_pad), 255, np.int32)
    label_size = np.minimum(sizes + np.array([4, 3]), label_pad).astype(np.int32)
    for i, ((h, w), (lh, lw)) in enumerate(zip(sizes, label_size, strict=True)):
        image[i, :h, :w] = rng.normal(size=(h, w, 3))
        label[i, :lh, :lw] = rng.integers(0, C, size=(lh, lw))
    return {
        "image": image,
        "image_size": np.asarray(sizes, np.int32),
        "label": label,
        "label_size": label_size,
        "mask": np.ones(b, bool),
        "index": np.arange(b, dtype=np.int32),
    }


def _init(model, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 12, 16, 3)))


def _mesh(n):
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def _config(**fields):
    base = dict(
        mode="whole",
        crop_size=(12, 16),
        stride=(8, 10),
        windows_per_step=4,
        scales=(1.0,),
        flip=False,
    )
    return ml_collections.ConfigDict(base | fields)


def _predict(model, variables, batch, eval_config):
    fn = jax.jit(
        functools.partial(
            evaluate.predict_batch,
            model,
            out_shape=batch["label"].shape[1:],
            eval_config=eval_config,
        )
    )
    return np.asarray(fn(variables, batch))


def _slide_reference(apply, image, crop, stride):
    """MMSegmentation 0.13's slide_inference, written plainly: image [h, w, 3] -> float64
    logits [h, w, C]."""
    h, w = image.shape[:2]
    (ch, cw), (sh, sw) = crop, stride
    grids_h = max(h - ch + sh - 1, 0) // sh + 1
    grids_w = max(w - cw + sw - 1, 0) // sw + 1
    preds = np.zeros((h, w, C))
    count = np.zeros((h, w))
    for i in range(grids_h):
        for j in range(grids_w):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            preds[y1:y2, x1:x2] += np.asarray(apply(image[None, y1:y2, x1:x2]))[0]
            count[y1:y2, x1:x2] += 1
    assert count.min() > 0
    return preds / count[..., None]


# --------------------------------------------------------------------------------------


def test_slide_equals_a_plain_numpy_slide_inference():
    """Overlapping windows, a different grid per image (6, 4, 1 and 6 windows), 4 windows
    per step (so the second step is partly beyond each grid): the valid region of every
    image equals the reference's logits."""
    model = TinyNet()
    variables = _init(model)
    batch = _batch()
    apply = jax.jit(functools.partial(evaluate._model_logits, model, variables))
    got = jax.jit(
        functools.partial(
            evaluate.slide_logits, apply, crop_size=(12, 16), stride=(8, 10), windows_per_step=4
        )
    )(batch["image"], batch["image_size"])
    for i, (h, w) in enumerate(SIZES):
        want = _slide_reference(apply, batch["image"][i, :h, :w], (12, 16), (8, 10))
        np.testing.assert_allclose(np.asarray(got[i, :h, :w]), want, rtol=1e-5, atol=1e-5)
    # Each image has its own grid: its windows never read another image's size.
    assert [(max(h - 12 + 7, 0) // 8 + 1) * (max(w - 16 + 9, 0) // 10 + 1) for h, w in SIZES] == [
        6,
        4,
        1,
        6,
    ]


def test_slide_with_one_window_equals_whole():
    model = TinyNet()
    variables = _init(model)
    batch = _batch(seed=1)
    whole = _predict(model, variables, batch, _config())
    # Windows of the padded size: every image is one window (stride = crop, no overlap);
    # 3 windows per step, 2 of them beyond every grid.
    one = _config(mode="slide", crop_size=PAD, stride=PAD, windows_per_step=3)
    np.testing.assert_array_equal(_predict(model, variables, batch, one), whole)
    # Overlapping windows do change predictions: the comparison above tests the mode.
    assert (_predict(model, variables, batch, _config(mode="slide")) != whole).any()


def test_one_scale_without_flip_is_whole_and_repeated_scales_average_probabilities():
    model = TinyNet()
    variables = _init(model)
    batch = _batch(seed=2)
    whole = _predict(model, variables, batch, None)
    np.testing.assert_array_equal(_predict(model, variables, batch, _config()), whole)
    # Two identical passes: the mean of two equal softmaxes has the logits' argmax.
    np.testing.assert_array_equal(_predict(model, variables, batch, _config(scales=(1, 1))), whole)
    pred = _predict(model, variables, batch, _config(mode="slide", scales=(0.5, 1.0, 1.5)))
    assert pred.shape == whole.shape and set(np.unique(pred)) <= {0, 1, 2}
    assert (pred != whole).any()  # the other scales change something


def test_flip_of_a_mirror_symmetric_model_changes_nothing():
    model = MirrorNet()
    variables = _init(model)
    batch = _batch(seed=3)  # images narrower than the padding: flips stay per image
    inside = batch["label"] != 255  # predictions beyond each label are filler
    # Slide windows mirror onto each other only when each row has at most 2 (the grid is
    # anchored at the left): crop width 20, stride 16 on widths <= 36.
    for mode, scales in [("whole", (1.0,)), ("slide", (0.75,))]:
        config = functools.partial(
            _config, mode=mode, scales=scales, crop_size=(12, 20), stride=(8, 16)
        )
        plain = _predict(model, variables, batch, config())
        flipped = _predict(model, variables, batch, config(flip=True))
        np.testing.assert_array_equal(flipped[inside], plain[inside])
    # The same flip with a model that is not symmetric does change predictions.
    tiny = TinyNet()
    tiny_vars = _init(tiny)
    plain = _predict(tiny, tiny_vars, batch, _config())
    assert (_predict(tiny, tiny_vars, batch, _config(flip=True))[inside] != plain[inside]).any()


def test_flip_valid_mirrors_each_image_region_only():
    x = jnp.arange(2 * 5).reshape(2, 1, 5)
    got = evaluate.flip_valid(x, jnp.array([3, 5]))
    np.testing.assert_array_equal(got, [[[2, 1, 0, 3, 4]], [[9, 8, 7, 6, 5]]])


def test_rescale_matches_bilinear_resize_and_zero_pads():
    rng = np.random.default_rng(4)
    image = np.zeros((2, 8, 12, 3), np.float32)
    image[0] = rng.normal(size=(8, 12, 3))
    image[1, :6, :10] = rng.normal(size=(6, 10, 3))
    rescale = jax.jit(evaluate.rescale_images, static_argnums=2)
    out, size = rescale(jnp.asarray(image), jnp.array([[8, 12], [6, 10]]), 0.5)
    assert out.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(size, [[4, 6], [3, 5]])
    # A full-size image: exactly PyTorch's bilinear resize (align_corners=False).
    np.testing.assert_allclose(out[0], resize(jnp.asarray(image[:1]), (4, 6))[0], atol=1e-6)
    np.testing.assert_allclose(
        out[1, :3, :5], resize(jnp.asarray(image[1:, :6, :10]), (3, 5))[0], atol=1e-6
    )
    assert not np.asarray(out[1, 3:]).any() and not np.asarray(out[1, :, 5:]).any()


def test_sharded_confusion_equals_single_device_with_fillers():
    """11 images of different sizes, batches of 8 (the last one has 5 fillers): the confusion
    matrix over 8 devices equals the one on a single device exactly, and counts exactly the
    labelled pixels of the 11 images."""
    model = TinyNet()
    variables = _init(model)
    sizes = np.array([[20, 36], [15, 23], [12, 16], [17, 30]] * 3, np.int32)[:11]
    examples = _batch(seed=5, sizes=sizes)
    batches = []
    for start in (0, 8):
        part = {k: v[start : start + 8] for k, v in examples.items()}
        fill = 8 - len(part["mask"])
        if fill:  # fillers as input_pipeline makes them: image 0, label 255, sizes 0
            part = {
                k: np.concatenate([v, np.zeros((fill, *v.shape[1:]), v.dtype)])
                for k, v in part.items()
            }
            part["label"][-fill:] = 255
            part["mask"][-fill:] = False
            part["label"][-fill:, :2, :2] = 0  # must not be counted: the example is masked
        batches.append(part)
    config = _config(mode="slide")
    step = evaluate.make_confusion_step(model, C, eval_config=config)
    total = metrics.Confusion.zeros(C)
    for batch in batches:
        total = step(variables, input_pipeline.to_global_array(batch, _mesh(8)), total)
    sharded = metrics.to_counts(total)
    assert sharded.sum() == (examples["label"] != 255).sum() == np.prod(sizes + [4, 3], 1).sum()
    place = functools.partial(input_pipeline.to_global_array, mesh=_mesh(1))
    single = evaluate.evaluate(model, variables, batches, C, place=place, eval_config=config)
    want = metrics.segmentation_metrics(sharded)
    for key in ("miou", "aacc", "macc", "fwiou"):
        assert single[key] == want[key], key
    np.testing.assert_array_equal(single["iou"], want["iou"])


def test_predictions_and_labels_of_different_shapes_name_both():
    with pytest.raises(ValueError, match=r"pred \(2, 24, 40\) and label \(2, 24, 41\)"):
        metrics.confusion_matrix(jnp.zeros((2, 24, 40), int), jnp.zeros((2, 24, 41), int), C)


def test_config_fields_and_bad_values():
    config = common.evaluation(common.cityscapes())
    assert config.mode == "whole" and config.scales == (1.0,) and not config.flip
    assert config.crop_size == (512, 1024) and config.stride == (341, 682)
    assert evaluate.eval_options(config) == evaluate.WHOLE_ONE_SCALE
    slide = evaluate.eval_options(dict(config.items()) | {"mode": "slide"})
    assert slide.crop_size == (512, 1024) and slide.windows_per_step == 2
    for name in ("demo", "cityscapes_deeplab", "ade20k_upernet_swin", "coco_stuff_ocrnet"):
        config = configs.get_config(name)
        assert evaluate.eval_options(config.eval) == evaluate.WHOLE_ONE_SCALE, name
        config.eval.mode = "slide"
        crop = tuple(config.data.crop_size)
        assert evaluate.eval_options(config.eval).crop_size == crop, name
    for bad, match in [
        (dict(mode="sliding"), "mode must be one of"),
        (dict(mode="slide", stride=(13, 10)), "at most crop_size"),
        (dict(mode="slide", windows_per_step=0), "windows_per_step"),
        (dict(scales=(0.0, 1.0)), "positive ratios"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate.eval_options(_config(**bad))
    # No competing defaults: a hand-built config missing a field is told where one comes from.
    for name, fields in [("flip", dict(mode="whole", scales=(1.0,))), ("windows_per_step", {})]:
        partial = {k: v for k, v in _config(mode="slide").items() if k != name} | fields
        with pytest.raises(ValueError, match=rf"config.eval.{name} is missing.*evaluation\("):
            evaluate.eval_options(partial)


# --------------------------------------------------------------------------------------
# Evaluator: compiled once per run; labels outside the classes


def _eval_batches(seed, n=2):
    return [_batch(seed=seed + i) for i in range(n)]


def test_evaluator_compiles_once_over_three_evaluations_and_equals_evaluate():
    """Three evaluations through one Evaluator (batches sharded over 4 devices) compile the
    confusion step once: its first total starts with the sharding the step returns, so the
    second call does not recompile for a committed total (before: 2 compilations, then 1
    per evaluation). evaluate.evaluate, a one-off Evaluator, gives the same metrics."""
    model = TinyNet()
    variables = _init(model)
    place = functools.partial(input_pipeline.to_global_array, mesh=_mesh(4))
    kw = dict(place=place, eval_config=_config(), class_names=["a", "b", "c"])
    with COMPILES as compiles:
        want = evaluate.evaluate(model, variables, _eval_batches(0), C, **kw)
    assert compiles.count >= 1  # the counter does count this program's compilation
    evaluator = evaluate.Evaluator(model, C, **kw)
    with COMPILES as compiles:
        got = [evaluator(variables, _eval_batches(s)) for s in (0, 5, 9)]
    assert compiles.count == 1
    assert got[0].keys() == want.keys()
    for key in ("miou", "aacc", "macc", "fwiou", "iou/b"):
        assert got[0][key] == want[key], key
    np.testing.assert_array_equal(got[0]["iou"], want["iou"])
    assert got[1]["aacc"] != got[0]["aacc"] != got[2]["aacc"]  # each pass starts from zero


def test_labels_outside_the_classes_raise_after_the_pass():
    """Labels >= C and negative ones (neither counted in the confusion matrix) are counted
    on device and reported with their number; ignore_index and masked fillers are not."""
    model = TinyNet()
    variables = _init(model)
    place = functools.partial(input_pipeline.to_global_array, mesh=_mesh(4))
    evaluator = evaluate.Evaluator(model, C, place=place, eval_config=None)
    batches = _eval_batches(0)
    clean = evaluator(variables, batches)  # labels in [0, C) and 255 only: fine
    batches[0]["label"][0, :2, :3] = C  # 6 pixels of a class the model does not have
    batches[1]["label"][2, 0, :4] = -1  # 4 negative ones
    batches[1]["label"][3, 0, :5] = 255  # ignored: not counted
    batches[1]["mask"][1] = False  # a filler: its labels are not counted
    batches[1]["label"][1, :3, :3] = 7
    msg = r"labels outside \[0, 3\) that are not ignore_index=255: 10 pixels; does model.num"
    with pytest.raises(ValueError, match=msg):
        evaluator(variables, batches)
    assert metrics.outside_count(evaluator.confusion(variables, batches)) == 10
    # The confusion matrix alone drops those pixels silently, so the metrics looked valid.
    counts = metrics.to_counts(evaluator.confusion(variables, batches))
    assert counts.sum() < metrics.to_counts(evaluator.confusion(variables, _eval_batches(0))).sum()
    assert np.isfinite(clean["miou"])


def test_count_outside_matches_numpy():
    label = np.array([[0, 2, 3, -1], [255, 254, 1, 3]])
    assert int(metrics.count_outside(jnp.asarray(label), 3)) == 4  # 3, -1, 254, 3
    assert int(metrics.count_outside(jnp.asarray(label), 3, ignore_index=254)) == 4  # 255


# --------------------------------------------------------------------------------------
# Memory: slide mode at Cityscapes' size


def _temp_bytes(model, variables, mode, size, per_step=2):
    """Compiled temporary bytes of predict_batch on one image of `size` (labels alike)."""
    config = _config(mode=mode, crop_size=(256, 512), stride=(170, 340), windows_per_step=per_step)
    batch = {
        "image": jax.ShapeDtypeStruct((1, *size, 3), jnp.float32),
        "image_size": jax.ShapeDtypeStruct((1, 2), jnp.int32),
        "label_size": jax.ShapeDtypeStruct((1, 2), jnp.int32),
    }
    fn = functools.partial(evaluate.predict_batch, model, out_shape=size, eval_config=config)
    compiled = jax.jit(fn).lower(variables, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# Slide mode's temporaries grow with the image by at most 3 [C] float32 vectors + 8 bytes per
# pixel (the logits accumulator, its crop and its resize to the label; the window count):
SLIDE_BYTES_PER_PIXEL = 3 * 4 * C + 8  # = 44 for C = 3
SLIDE_BYTES_1024x2048 = 80 * 2**20  # at 1024 x 2048 (crop 256 x 512, 2 windows per step)


def test_slide_memory_grows_only_by_full_image_buffers():
    """From 512 x 1024 to 1024 x 2048, slide mode's compiled temporaries grow by the
    full-image logits buffers only (measured on CPU: 28 bytes per added pixel, total 68.0
    MiB at 1024 x 2048, with 64-channel features), whereas whole mode keeps the model's
    activations of the whole image (measured: 67 bytes per added pixel)."""
    model = TinyNet(features=64)
    variables = _init(model)
    added = 1024 * 2048 - 512 * 1024
    slide_large = _temp_bytes(model, variables, "slide", (1024, 2048))
    slide = (slide_large - _temp_bytes(model, variables, "slide", (512, 1024))) / added
    whole = (
        _temp_bytes(model, variables, "whole", (1024, 2048))
        - _temp_bytes(model, variables, "whole", (512, 1024))
    ) / added
    assert slide <= SLIDE_BYTES_PER_PIXEL, slide
    assert slide_large <= SLIDE_BYTES_1024x2048, slide_large
    assert whole >= 2 * slide, (whole, slide)
