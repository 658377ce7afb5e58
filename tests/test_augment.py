"""Properties of the joint image + label augmentations (pne_jax/augment.py)."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from pne_jax import augment as A
from pne_jax import input_pipeline
from pne_jax.configs import common


def make_aug(base_size=(64, 48), crop_size=(32, 40), **fields):
    """The recipe of `common.data` (its one set of defaults), with `fields` overridden."""
    data = common.data("test", base_size=base_size, crop_size=crop_size, test_size=base_size)
    data.update(fields)
    return input_pipeline.train_augment(ml_collections.ConfigDict({"data": data}))


AUG = make_aug()


def make_example(seed, h=48, w=64, classes=(0, 3, 7, 11)):
    """A noisy image and a label of vertical class bands with scattered ignore pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    bands = np.asarray(classes, np.uint8)[(np.arange(w) * len(classes)) // w]
    label = np.broadcast_to(bands, (h, w)).copy()
    label[rng.random((h, w)) < 0.1] = 255
    return image, label


def reference_chain(rng, image, label, aug):
    """The chain op by op, on fully resized arrays; train_transform must match it."""
    size = A.keep_ratio_size(label.shape, A.random_scale(rng, aug.base_size, aug.ratio_range))
    image, label = A.rescale(image, label, size)
    image, label = A.random_crop(
        rng, image, label, aug.crop_size, aug.cat_max_ratio, aug.ignore_index
    )
    image, label = A.random_hflip(rng, image, label, aug.flip_prob)
    if aug.photometric:
        image = A.photometric_distortion(rng, image)
    image = A.pad_to(A.normalize(image), aug.crop_size, 0.0)
    return image, A.pad_to(label, aug.crop_size, aug.ignore_index)


def allowed(label):
    return set(np.unique(label).tolist()) | {255}


@pytest.mark.parametrize("seed", range(4))
def test_labels_only_take_input_values(seed):
    image, label = make_example(seed)
    rng = np.random.default_rng(seed)
    ok = allowed(label)
    for size in [(17, 23), (96, 128), (48, 64), (5, 200)]:
        assert set(np.unique(A.rescale(image, label, size)[1])) <= ok
    assert set(np.unique(A.random_crop(rng, image, label, (30, 30), 0.75)[1])) <= ok
    assert set(np.unique(A.hflip(image, label)[1])) <= ok
    assert set(np.unique(A.pad_to(label, (60, 70), 255))) <= ok
    for s in range(10):
        out = A.train_transform(np.random.default_rng([seed, s]), image, label, AUG)[1]
        assert out.shape == AUG.crop_size and out.dtype == np.uint8
        assert set(np.unique(out)) <= ok


def test_crops_respect_cat_max_ratio():
    # Class 1 covers a 24-pixel-wide strip of a 64-wide map: a 32-wide window is balanced
    # (class 1 under 75%, class 0 present) unless it lies (almost) entirely in one class.
    label = np.zeros((16, 64), np.uint8)
    label[:, 20:44] = 1
    label[::3, ::5] = 255
    image = np.zeros((16, 64, 3), np.uint8)
    unbalanced = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        crop = A.random_crop(rng, image, label, (16, 32), cat_max_ratio=0.75)[1]
        assert A.crop_is_balanced(crop, 0.75)
        crop = A.random_crop(np.random.default_rng(seed), image, label, (16, 32))[1]
        unbalanced += not A.crop_is_balanced(crop, 0.75)
    assert unbalanced > 20  # without the constraint, unbalanced crops do occur
    # And through the full chain at scale 1.
    aug = make_aug(base_size=(64, 16), crop_size=(16, 32), ratio_range=(1.0, 1.0))
    for seed in range(50):
        out = A.train_transform(np.random.default_rng(seed), image, label, aug)[1]
        assert A.crop_is_balanced(out, 0.75)


def test_crop_without_balanced_window_keeps_the_last_draw():
    rows, cols = np.mgrid[:20, :20].astype(np.uint8)
    image = np.stack([rows, cols, rows], axis=-1)  # pixels know where they are
    label = np.full((20, 20), 4, np.uint8)  # no window is balanced
    out = A.random_crop(np.random.default_rng(0), image, label, (8, 8), cat_max_ratio=0.75)
    replay = np.random.default_rng(0)
    windows = [(replay.integers(0, 13), replay.integers(0, 13)) for _ in range(11)]
    assert (out[0][0, 0, 0], out[0][0, 0, 1]) == windows[-1]  # 1 + CROP_RETRIES draws
    assert out[0].shape == (8, 8, 3) and out[1].shape == (8, 8)


def test_balance_ignores_ignore_pixels():
    label = np.full((10, 10), 255, np.uint8)
    label[0, :5], label[1, :5] = 1, 2
    assert A.crop_is_balanced(label, 0.75)  # 5 + 5 labelled pixels: 50%
    label[1, :5] = 1
    assert not A.crop_is_balanced(label, 0.75)  # one class only


@pytest.mark.parametrize("seed", range(3))
def test_flip_commutes_with_label_mapping(seed):
    image, label = make_example(seed)
    mapping = np.arange(256, dtype=np.uint8)
    mapping[[0, 3, 7, 11]] = [9, 1, 0, 4]  # a relabelling: a bijection on the classes
    assert np.array_equal(A.hflip(image, mapping[label])[1], mapping[A.hflip(image, label)[1]])
    for s in range(5):  # and through the whole chain, whose flip is drawn at random
        a = A.train_transform(np.random.default_rng(s), image, mapping[label], AUG)
        b = A.train_transform(np.random.default_rng(s), image, label, AUG)
        assert np.array_equal(a[1], mapping[b[1]])
        np.testing.assert_array_equal(a[0], b[0])


def test_rescale_keeps_ratio_and_stays_in_range():
    rng = np.random.default_rng(0)
    base, (lo, hi) = (2048, 1024), (0.5, 2.0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(100, 3000, size=2))
        nh, nw = A.keep_ratio_size((h, w), A.random_scale(rng, base, (lo, hi)))
        assert abs(nh / nw - h / w) <= (h / w) / min(nh, nw) + 1e-9  # ratio within rounding
        long, short = max(nh, nw), min(nh, nw)
        assert long <= hi * base[0] + 0.5 and short <= hi * base[1] + 0.5
        # The fit touches the scaled box on one edge, so it is at least lo * base there.
        assert long >= lo * base[0] - 1 or short >= lo * base[1] - 1
    assert A.keep_ratio_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert A.keep_ratio_size((500, 375), (2048, 512)) == (683, 512)
    image, label = make_example(0)
    out_image, out_label = A.rescale(image, label, (30, 40))
    assert out_image.shape == (30, 40, 3) and out_label.shape == (30, 40)


@pytest.mark.parametrize("photometric", [False, True])
def test_train_transform_matches_op_by_op_chain(photometric):
    aug = make_aug(cat_max_ratio=0.75, photometric=photometric)
    image, label = make_example(1)
    for seed in range(12):
        fused = A.train_transform(np.random.default_rng(seed), image, label, aug)
        ref = reference_chain(np.random.default_rng(seed), image, label, aug)
        np.testing.assert_array_equal(fused[1], ref[1])
        diff = np.abs(fused[0] - ref[0]) * np.asarray(A.IMAGENET_STD, np.float32)
        if photometric:  # PIL rounding differences of the window resize, through the tables
            assert diff.mean() < 0.5
        else:
            assert diff.max() <= 2.01


def test_same_seed_same_output_other_seed_differs():
    image, label = make_example(2)
    a = A.train_transform(np.random.default_rng(5), image, label, AUG)
    b = A.train_transform(np.random.default_rng(5), image, label, AUG)
    c = A.train_transform(np.random.default_rng(6), image, label, AUG)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    p = [A.photometric_distortion(np.random.default_rng(s), image) for s in (1, 1, 2)]
    np.testing.assert_array_equal(p[0], p[1])
    assert not np.array_equal(p[0], p[2])


@pytest.mark.parametrize("photometric", [False, True])
def test_draws_consume_the_generator_as_the_chain_does(photometric):
    """train_draws (and photometric_draws) use the generator exactly as train_transform (and
    photometric_distortion): the next draw after them agrees, the label is the chain's, and
    applying the draws to the pixels gives the chain's image."""
    aug = make_aug(cat_max_ratio=0.75, photometric=photometric)
    image, label = make_example(7)
    for seed in range(10):
        rng_draws, rng_chain = np.random.default_rng(seed), np.random.default_rng(seed)
        draws = A.train_draws(rng_draws, label, aug)
        out_image, out_label = A.train_transform(rng_chain, image, label, aug)
        assert rng_draws.random() == rng_chain.random()
        assert draws.label.dtype == np.uint8 and draws.label.shape == aug.crop_size
        np.testing.assert_array_equal(draws.label, out_label)
        assert (draws.photometric is not None) == photometric
        crop = A.resize_window(image, draws.size, draws.window)
        assert crop.shape[:2] == draws.window[2:] and draws.window[2] <= aug.crop_size[0]
        if draws.photometric is not None:
            crop = A.apply_photometric(crop, draws.photometric)
        want = A.pad_to(A.normalize(crop, flip=draws.flip), aug.crop_size, 0.0)
        np.testing.assert_array_equal(want, out_image)
        rng_draws, rng_chain = np.random.default_rng(seed), np.random.default_rng(seed)
        p = A.photometric_draws(rng_draws)
        distorted = A.photometric_distortion(rng_chain, image)
        assert rng_draws.random() == rng_chain.random()
        np.testing.assert_array_equal(A.apply_photometric(image, p), distorted)
    with pytest.raises(ValueError, match="label must be uint8"):
        A.train_draws(np.random.default_rng(0), label.astype(np.int32), aug)


def test_hue_steps_round_the_shift_of_every_table_entry():
    for hue in range(-18, 18):
        rounded_each = np.round(np.arange(256) + hue * 256 / 180).astype(np.int64) % 256
        np.testing.assert_array_equal((np.arange(256) + A.hue_steps(hue)) % 256, rounded_each)


def test_photometric_keeps_grey_grey_and_tables_truncate():
    grey = np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[:, None, None], (64, 8, 3))
    for seed in range(20):
        out = A.photometric_distortion(np.random.default_rng(seed), np.ascontiguousarray(grey))
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    lut = A._affine_lut(alpha=1.5, beta=0.0)
    assert lut[3] == 4 and lut[200] == 255 and lut[0] == 0  # 4.5 -> 4, 300 -> 255
    assert A._affine_lut(beta=-10.5)[5] == 0 and A._affine_lut(beta=10.7)[3] == 13


def test_normalize_and_pad_values_are_exact():
    image, label = make_example(3, h=5, w=7)
    out = A.normalize(image)
    mean, std = np.asarray(A.IMAGENET_MEAN), np.asarray(A.IMAGENET_STD)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (image - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(A.normalize(image, flip=True), out[:, ::-1])
    padded = A.pad_to(out, (8, 9), 0.0)
    assert padded.shape == (8, 9, 3)
    np.testing.assert_array_equal(padded[:5, :7], out)
    assert np.all(padded[5:] == 0) and np.all(padded[:, 7:] == 0)
    plabel = A.pad_to(label, (8, 9), 255)
    np.testing.assert_array_equal(plabel[:5, :7], label)
    assert np.all(plabel[5:] == 255) and np.all(plabel[:, 7:] == 255)
    with pytest.raises(ValueError, match="smaller size"):
        A.pad_to(label, (4, 9), 255)


def test_small_images_are_padded_to_the_crop():
    image, label = make_example(4, h=10, w=12)
    aug = make_aug(base_size=(12, 10), crop_size=(32, 40), ratio_range=(1.0, 1.0))
    out_image, out_label = A.train_transform(np.random.default_rng(0), image, label, aug)
    assert out_image.shape == (32, 40, 3) and out_label.shape == (32, 40)
    assert np.all(out_label[10:] == 255) and np.all(out_label[:, 12:] == 255)
    assert np.all(out_image[10:] == 0) and np.all(out_image[:, 12:] == 0)


def test_eval_transform_resizes_to_test_scale():
    image, _ = make_example(5, h=30, w=50)
    out = A.eval_transform(image, (100, 40))
    assert out.shape == (*A.keep_ratio_size((30, 50), (100, 40)), 3) == (40, 67, 3)
    np.testing.assert_allclose(A.eval_transform(image, (50, 30)), A.normalize(image))


def test_bad_input_raises():
    image, label = make_example(6)
    with pytest.raises(ValueError, match="image must be uint8"):
        A.train_transform(np.random.default_rng(0), image.astype(np.float32), label, AUG)
    with pytest.raises(ValueError, match="label must be uint8"):
        A.rescale(image, label.astype(np.int32), (10, 10))
    with pytest.raises(ValueError, match="differs from image size"):
        A.rescale(image, label[:-1], (10, 10))
    with pytest.raises(ValueError, match="ratio_range"):
        make_aug(ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        make_aug(crop_size=(0, 10))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        make_aug(cat_max_ratio=1.5)


def test_train_augment_has_no_defaults_of_its_own():
    """The recipe's values live in common.data only: TrainAugment requires them, and the
    config's values are the ones used (an old default of 0.5 would hide a config's 0.25)."""
    with pytest.raises(TypeError, match="missing 5 required"):
        A.TrainAugment(base_size=(64, 48), crop_size=(32, 40))
    fields = {
        f.name for f in dataclasses.fields(A.TrainAugment) if f.default is dataclasses.MISSING
    }
    assert fields == {"base_size", "crop_size", "ratio_range", "cat_max_ratio", "flip_prob"} | {
        "photometric",
        "ignore_index",
    }
    assert make_aug(flip_prob=0.25, photometric=False).flip_prob == 0.25
    config = ml_collections.ConfigDict({"data": {"base_size": (64, 48)}})
    with pytest.raises(ValueError, match=r"config.data.crop_size is missing.*common.data\("):
        input_pipeline.train_augment(config)
