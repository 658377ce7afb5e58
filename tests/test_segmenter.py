"""`Segmenter` against `evaluate.predict_batch` run on each image alone, in each test mode;
its size buckets bound the compilations; images of other kinds are converted or refused.
The demo's model, narrower, at random initialisation, at small sizes (test scale 96 x 48)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from PIL import Image

from pne_jax import Segmenter, evaluate, preprocess
from pne_jax.augment import eval_transform
from pne_jax.configs import demo
from pne_jax.datasets.images import UnsupportedImageError
from pne_jax.models import build_model
from pne_jax.models.numpy_init import random_variables
from pne_jax.segmenter import as_rgb, group_batch_size, size_bucket
from tests.compile_count import COMPILES

TEST_SIZE = (96, 48)
SIZES = [(40, 60), (44, 62), (30, 30)]  # the first two share a bucket: a batch of two
MODES = {
    "whole": {},
    "slide": {"mode": "slide", "crop_size": (32, 32), "stride": (20, 20)},
    "multi_scale_flip": {"scales": (0.75, 1.0), "flip": True},
}


def _config(**eval_changes):
    """The demo's config with a narrower model (compiles faster), at a smaller test scale."""
    config = demo.get_config()
    config.data.test_size = TEST_SIZE
    config.model.update(channels=16, aspp_dilations=(1, 2))
    config.model.aux_head.channels = 8
    config.model.projection.enabled = False
    config.eval.update(eval_changes)
    return config


@pytest.fixture(scope="module")
def variables():
    """Random weights, the classifier's bias moved so that every class wins somewhere (at
    initialisation one class wins everywhere, and a comparison of labels could not fail)."""
    model = build_model(_config().model)
    image = eval_transform(_images([(64, 96)], seed=11)[0], TEST_SIZE)[None]
    variables = random_variables(model, image, seed=3)
    logits = jax.jit(lambda v: model.apply(v, image, train=False)["logits"])(variables)
    head = variables["params"]["decode_head"]["cls"]["conv_seg"]
    head["bias"] = head["bias"] - np.asarray(logits).mean(axis=(0, 1, 2))
    return variables


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth-ish images (blocks), so that predictions vary over the image.
    return [
        np.kron(rng.integers(0, 256, (-(-h // 4), -(-w // 4), 3)), np.ones((4, 4, 1)))[
            :h, :w
        ].astype(np.uint8)
        for h, w in sizes
    ]


def _alone(config, variables, image, kind, buckets=True):
    """The device preprocessing (`preprocess.eval_batch`) and predict_batch (or
    predict_probabilities) of one image, in a batch of its own, padded to its bucket (or
    not at all)."""
    size = image.shape[:2]
    bucket, canvas = size, preprocess.resized_size(size, config.data.test_size)
    if buckets:
        bucket, canvas = tuple(map(size_bucket, bucket)), tuple(map(size_bucket, canvas))
    images = np.zeros((1, *bucket, 3), np.uint8)
    images[0, : size[0], : size[1]] = image
    reference = _reference(kind, bucket, canvas, _hashable(config.eval))
    result = reference(variables, images, np.array([size], np.int32))
    return np.asarray(result)[0, : size[0], : size[1]]


def _alone_on_the_host(config, variables, image):
    """predict_batch on one image preprocessed as evaluation does (on the host)."""
    normalized = eval_transform(image, config.data.test_size)
    model = build_model(config.model)
    batch = {
        "image": normalized[None],
        "image_size": np.array([normalized.shape[:2]], np.int32),
        "label_size": np.array([image.shape[:2]], np.int32),
    }
    return np.asarray(evaluate.predict_batch(model, variables, batch, image.shape[:2]))[0]


def _hashable(eval_config):
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in eval_config.items())
    )


@functools.cache
def _reference(kind, bucket, canvas, eval_items):
    """One jitted reference per test mode and shape (reused across images)."""
    infer = evaluate.predict_batch if kind == "labels" else evaluate.predict_probabilities
    model = build_model(_config().model)

    def predict(variables, images, sizes):
        batch = preprocess.eval_batch(images, sizes, TEST_SIZE, canvas)
        return infer(model, variables, batch, bucket, dict(eval_items))

    return jax.jit(predict)


def test_size_bucket_is_the_ladder():
    ladder = sorted({2**k for k in range(5, 14)} | {3 * 2 ** (k - 1) for k in range(5, 14)})
    assert ladder[:6] == [32, 48, 64, 96, 128, 192]
    for n in range(1, 8000):
        assert size_bucket(n) == next(v for v in ladder if v >= n), n
    assert [group_batch_size(8, n) for n in (1, 2, 3, 5, 8, 9, 20)] == [1, 2, 4, 8, 8, 8, 8]
    assert group_batch_size(6, 5) == 6


@pytest.fixture(scope="module")
def segmenter(variables):
    """In whole mode (the demo's config.eval), batches of two."""
    return Segmenter(_config(), variables, batch_size=2)


@pytest.mark.parametrize("mode", list(MODES))
def test_segment_equals_predict_batch_on_each_image_alone(variables, segmenter, mode):
    """Whole mode, slide mode from the config, multi-scale + flip asked for per call."""
    config = _config(**MODES[mode])
    images = _images(SIZES)
    if mode == "slide":
        segmenter = Segmenter(config, variables, batch_size=2)
        labels = segmenter.segment(images)
    else:
        labels = segmenter.segment(images, **MODES[mode])
    for image, label in zip(images, labels, strict=True):
        want = _alone(config, variables, image, "labels")
        assert label.shape == image.shape[:2] and label.dtype == np.int32
        assert len(np.unique(want)) > 1  # the comparison can fail
        np.testing.assert_array_equal(label, want)
    if mode == "whole":
        probabilities = segmenter.probabilities(images[0])
        want = _alone(config, variables, images[0], "probabilities")
        np.testing.assert_allclose(probabilities, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(probabilities.argmax(-1), labels[0])
    with pytest.raises(ValueError, match="config.eval.mode must be one of"):
        segmenter.segment(images, mode="sliding")


def test_without_buckets_each_image_is_predicted_exactly_as_alone(variables):
    config = _config()
    segmenter = Segmenter(config, variables, batch_size=4, size_buckets=False)
    images = _images(SIZES[:2], seed=1)  # two sizes, one bucket: padding would show
    for image, label in zip(images, segmenter.segment(images), strict=True):
        np.testing.assert_array_equal(label, _alone(config, variables, image, "labels", False))
        # The evaluation's host preprocessing differs by a level in a few pixels (PIL's
        # fixed point): the labels agree but where two classes nearly tie.
        on_the_host = _alone_on_the_host(config, variables, image)
        assert (label == on_the_host).mean() > 0.99


def test_twenty_mixed_sizes_compile_once_per_bucket(variables):
    rng = np.random.default_rng(5)
    sizes = [tuple(int(v) for v in rng.integers(33, 49, 2)) for _ in range(20)]
    images = _images(sizes, seed=5)
    segmenter = Segmenter(_config(), variables, batch_size=4)
    buckets = {
        (tuple(map(size_bucket, s)), tuple(map(size_bucket, preprocess.resized_size(s, TEST_SIZE))))
        for s in sizes
    }
    assert 2 <= len(buckets) <= 6 and len(set(sizes)) > 15  # 20 sizes, a few buckets
    with COMPILES as counter:
        labels = segmenter.segment(images)
    assert counter.count == len(buckets) == segmenter.compilations
    assert [label.shape for label in labels] == sizes
    with COMPILES as counter:
        again = segmenter.segment(images[::-1])
    assert counter.count == 0  # the same buckets and batch sizes: nothing new
    for a, b in zip(labels, again[::-1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_images_of_other_kinds(segmenter, tmp_path, caplog):
    rgb = _images([(40, 60)], seed=7)[0]
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    want = segmenter.segment(rgb)
    np.testing.assert_array_equal(segmenter.segment(str(path)), want)
    np.testing.assert_array_equal(segmenter.segment(Image.open(path)), want)
    np.testing.assert_array_equal(segmenter.segment([path])[0], want)
    assert segmenter.segment([]) == []
    stacked = segmenter.segment(np.stack([rgb, rgb]))  # a 4-D array: a list of images
    assert len(stacked) == 2 and all((label == want).all() for label in stacked)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(as_rgb(grey), np.stack([grey] * 3, -1))
    np.testing.assert_array_equal(as_rgb(grey[..., None]), np.stack([grey] * 3, -1))
    wide = rgb.astype(np.uint16) * 256 + 255  # 16-bit: the high byte is the 8-bit image
    np.testing.assert_array_equal(as_rgb(wide), rgb)
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(as_rgb(rgba), rgb)
    assert "alpha dropped" in caplog.text and "kept the high byte" in caplog.text
    for bad, shown in [
        (rgb.astype(np.float32) / 255, "float32 array of shape (40, 60, 3)"),
        (rgb[..., :2], "uint8 array of shape (40, 60, 2)"),
        (rgb[None], "uint8 array of shape (1, 40, 60, 3)"),
        (np.zeros((0, 5, 3), np.uint8), "is empty"),
        (np.zeros((1, 16385, 3), np.uint8), "larger than 16384 pixels a side"),
    ]:
        with pytest.raises(
            UnsupportedImageError, match=shown.replace("(", r"\(").replace(")", r"\)")
        ):
            segmenter.segment([rgb, bad])


def test_colorize_overlay_and_class_names(segmenter):
    rgb = _images([(40, 60)], seed=8)[0]
    label = segmenter.segment(rgb)
    colored = segmenter.colorize(label)
    np.testing.assert_array_equal(colored, segmenter.palette[label])
    np.testing.assert_array_equal(
        segmenter.overlay(rgb, label, alpha=1.0), colored
    )  # alpha 1: the colours alone
    assert segmenter.class_names[:3] == ["sky", "vegetation", "road"]
    assert len(segmenter.class_names) == segmenter.num_classes == 10
