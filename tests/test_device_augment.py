"""The training augmentation on the device (pne_jax/device_augment.py) against the host's chain
(`augment.train_transform`: PIL's resize and HSV), which it must equal: same draws from the
same generator, the same labels, the same pixel levels."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from PIL import Image

from pne_jax import augment as A
from pne_jax import device_augment as D
from tests.test_augment import make_aug

CROP = (24, 40)
SOURCE = (80, 96)
# Landscape, enlarged up to 2x and shrunk to a quarter (then smaller than the crop: padded);
# portrait (PIL resizes its height first); small (mostly enlarged, padded).
SHAPES = [(48, 96), (80, 36), (18, 30)]
SEEDS = 50
augment_batch = jax.jit(D.augment_batch, static_argnums=1)


def aug_for(**fields):
    fields = dict(base_size=(96, 48), crop_size=CROP, ratio_range=(0.25, 2.0)) | fields
    return make_aug(cat_max_ratio=0.75, **fields)


def example(shape, seed):
    """A noisy image and a label mostly of one class (so that crops are redrawn), with a
    strip of two others and scattered ignore pixels."""
    rng = np.random.default_rng([seed, *shape])
    h, w = shape
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2] //= 8  # dark rows: contrast and brightness clip differently there
    label = np.full((h, w), 2, np.uint8)
    label[:, -w // 4 :] = 5
    label[-h // 5 :, : w // 3] = 9
    label[rng.random((h, w)) < 0.1] = 255
    return image, label


def stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def levels(image, aug):
    """Normalised images back in levels of 255."""
    return np.asarray(image) * np.asarray(aug.std, np.float32) + np.asarray(aug.mean, np.float32)


def assert_same_as_host(batch, hosts, aug):
    got = jax.device_get(augment_batch(batch, aug))
    want_image = np.stack([h[0] for h in hosts])
    want_label = np.stack([h[1] for h in hosts]).astype(np.int32)
    assert got["image"].shape == want_image.shape and got["image"].dtype == np.float32
    assert got["label"].dtype == np.int32
    np.testing.assert_array_equal(got["label"], want_label)
    # Normalisation is the same float32 arithmetic; compare levels, where 1e-3 is far below
    # the 1 of any pixel difference.
    np.testing.assert_allclose(
        levels(got["image"], aug), levels(want_image, aug), rtol=0, atol=1e-3
    )
    return got


@pytest.mark.parametrize("photometric", [True, False])
def test_device_chain_equals_the_host_chain(photometric, monkeypatch):
    """50 seeds of each shape, one batch per shape: labels (retries, flips, padding) and
    images equal to train_transform's, with and without the photometric distortion."""
    aug = aug_for(photometric=photometric)
    balance_checks = []
    check = A.crop_is_balanced
    monkeypatch.setattr(A, "crop_is_balanced", lambda *a: balance_checks.append(1) or check(*a))
    seen = dict(vertical_first=0, flip=0, padded=0, enlarged=0, shrunk=0, hsv=0)
    for shape in SHAPES:
        examples, hosts = [], []
        for seed in range(SEEDS):
            image, label = example(shape, seed)
            examples.append(
                D.device_example(np.random.default_rng(seed), image, label, aug, SOURCE)
            )
            hosts.append(A.train_transform(np.random.default_rng(seed), image, label, aug))
        batch = stack(examples)
        assert not batch["fallback"].any()
        assert_same_as_host(batch, hosts, aug)
        seen["vertical_first"] += batch["vertical_first"].sum()
        seen["flip"] += batch["flip"].sum()
        seen["padded"] += (batch["window_size"] < CROP).any(1).sum()
        region = batch["region_size"]
        seen["enlarged"] += (region < batch["window_size"]).all(1).sum()
        seen["shrunk"] += (region > batch["window_size"] + 1).all(1).sum()
        seen["hsv"] += batch["photometric_on"][:, 2:].any(1).sum()
    assert len(balance_checks) > 3 * SEEDS  # crops were redrawn
    for key, count in seen.items():
        if key != "hsv" or photometric:
            assert 0 < count < 3 * SEEDS, (key, count)


def test_fallback_resizes_on_the_host_and_still_equals_it():
    """Regions larger than the source array, and shrinking beyond the taps (3 taps: scale
    at most 1), are resized on the host and copied by the device."""
    aug = aug_for()
    examples, hosts = [], []
    for seed, shape in itertools.product(range(16), SHAPES):
        image, label = example(shape, seed)
        examples.append(
            D.device_example(np.random.default_rng(seed), image, label, aug, CROP, taps=3)
        )
        hosts.append(A.train_transform(np.random.default_rng(seed), image, label, aug))
    batch = stack(examples)
    assert 0 < batch["fallback"].sum() < len(examples)
    assert not batch["vertical_first"][batch["fallback"]].any()
    assert_same_as_host(batch, hosts, aug)


def test_flip_and_pad_are_exact():
    """At scale 1 (a plain crop, no resampling) and without photometric distortion, the device
    gives the pixels themselves: flipped exactly, padded with 0 (image) and 255 (label)."""
    image, label = example((18, 30), 0)  # smaller than the crop: padded on both sides
    kept, mirrored = (
        aug_for(base_size=(30, 18), ratio_range=(1.0, 1.0), photometric=False, flip_prob=p)
        for p in (0.0, 1.0)
    )
    outs = []
    for aug in (kept, mirrored):
        ex = D.device_example(np.random.default_rng(0), image, label, aug, CROP)
        np.testing.assert_array_equal(ex["window_size"], (18, 30))
        assert ex["flip"] == (aug is mirrored) and not ex["fallback"]
        outs.append(jax.device_get(augment_batch(stack([ex]), aug)))
    plain = levels(outs[0]["image"][0], kept)
    np.testing.assert_allclose(plain[:18, :30], image, rtol=0, atol=1e-3)
    np.testing.assert_allclose(
        levels(outs[1]["image"][0], kept)[:18, :30], image[:, ::-1], atol=1e-3
    )
    for out in outs:
        assert (out["image"][0, 18:] == 0).all() and (out["image"][0, :, 30:] == 0).all()
        assert (out["label"][0, 18:] == 255).all() and (out["label"][0, :, 30:] == 255).all()
    np.testing.assert_array_equal(outs[1]["label"][0, :18, :30], label[:, ::-1])


def test_photometric_equals_the_host_in_every_combination():
    """Brightness on/off x contrast off/first/last x saturation on/off x hue on/off, with
    random parameters (the extremes included), on random images."""
    rng = np.random.default_rng(0)
    combos = list(
        itertools.product([False, True], [None, False, True], [False, True], [False, True])
    )
    images = rng.integers(0, 256, (len(combos), 16, 24, 3), dtype=np.uint8)
    images[:, :4] = rng.integers(0, 256, (len(combos), 4, 1, 3))  # greys and flat colours
    images[:, 4:6] = images[:, 4:6, :, :1]
    params, wants = [], []
    for i, (bright, contrast_last, sat, hue) in enumerate(combos):
        extreme = i % 3 == 0
        draws = A.PhotometricDraws(
            brightness=(32.0 if extreme else rng.uniform(-32, 32)) if bright else None,
            contrast=(1.5 if extreme else rng.uniform(0.5, 1.5))
            if contrast_last is not None
            else None,
            contrast_last=bool(contrast_last),
            saturation=(0.5 if extreme else rng.uniform(0.5, 1.5)) if sat else None,
            hue=(-18 if extreme else int(rng.integers(-18, 18))) if hue else None,
        )
        wants.append(A.apply_photometric(images[i], draws))
        params.append(D.photometric_params(draws))
        assert params[-1][1].tolist() == [bright, contrast_last is not None, sat, hue]
    values, on, last = (np.stack(p) for p in zip(*params, strict=True))
    assert last.sum() == len(combos) // 3 and values.dtype == np.float32
    got = jax.jit(D.photometric)(images, values, on, last)
    np.testing.assert_array_equal(np.asarray(got), np.stack(wants).astype(np.float32))


def test_hsv_round_trip_equals_pil_on_every_colour():
    """All 2**24 colours through RGB->HSV, and all 2**24 HSV triples back to RGB (in eight
    slices, to bound the memory)."""
    cube = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij"), -1)
    to_hsv, to_rgb = jax.jit(D.rgb_to_hsv), jax.jit(D.hsv_to_rgb)
    for part in np.split(cube.reshape(4096, 4096, 3), 8):
        want = np.asarray(Image.fromarray(part).convert("HSV"))
        np.testing.assert_array_equal(np.asarray(to_hsv(part.astype(np.int32))), want)
        want = np.asarray(Image.fromarray(part, "HSV").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(to_rgb(part.astype(np.int32))), want)


def test_coefficients_replay_pil_on_random_boxes():
    """pil_bilinear_taps, applied in PIL's integer arithmetic, is PIL's resize of a box: the
    coefficients are PIL's to the last bit (shrinking up to 8x, enlarging up to 20x)."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = (int(s) for s in rng.integers(4, 90, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (y0, y1), (x0, x1) = np.sort(rng.uniform(0, h, 2)), np.sort(rng.uniform(0, w, 2))
        oh, ow = (max(1, int(n / rng.uniform(0.05, 8))) for n in (y1 - y0 + 1, x1 - x0 + 1))
        want = np.asarray(
            Image.fromarray(image).resize((ow, oh), Image.BILINEAR, box=(x0, y0, x1, y1))
        )
        passes = {
            1: D.pil_bilinear_taps(w, x0, x1, ow),
            0: D.pil_bilinear_taps(h, y0, y1, oh),
        }
        height_first = h - oh > 0 and h - oh > (w - ow) * 2  # PIL's rule
        got = image.astype(np.int64)
        for axis in (0, 1) if height_first else (1, 0):
            start, count, taps = passes[axis]
            n = taps.shape[1]
            index = np.minimum(start[:, None] + np.arange(n), got.shape[axis] - 1)
            taps = np.where(np.arange(n) < count[:, None], taps, 0)
            gathered = np.take(got, index, axis=axis)  # [..., out, n, ...]
            shape = [1] * gathered.ndim
            shape[axis], shape[axis + 1] = taps.shape
            summed = (gathered * taps.reshape(shape)).sum(axis + 1)
            got = np.clip((summed + (1 << 21)) >> 22, 0, 255)
        np.testing.assert_array_equal(got, want)


def test_same_generator_same_batch():
    aug = aug_for()
    image, label = example((48, 96), 3)
    a, b, c = (
        D.device_example(np.random.default_rng(s), image, label, aug, SOURCE) for s in (7, 7, 8)
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    out_a, out_b = (jax.device_get(augment_batch(stack([e]), aug)) for e in (a, b))
    np.testing.assert_array_equal(out_a["image"], out_b["image"])


def test_source_too_small_for_the_crop_is_refused():
    message = (
        r"config.data.crop_size \(24, 40\) does not fit in config.data.device_source_size "
        r"\(24, 32\): make device_source_size at least crop_size"
    )
    with pytest.raises(ValueError, match=message):
        D.check_source_size(CROP, (24, 32))
    image, label = example((48, 96), 0)
    with pytest.raises(ValueError, match="device_source_size"):
        D.device_example(np.random.default_rng(0), image, label, aug_for(), (20, 96))
    batch = stack([D.device_example(np.random.default_rng(0), image, label, aug_for(), SOURCE)])
    with pytest.raises(ValueError, match=r"batch labels are \(24, 40\), aug.crop_size is"):
        D.augment_batch(batch, aug_for(crop_size=(24, 32)))
    with pytest.raises(ValueError, match="taps must be in"):
        D.device_example(np.random.default_rng(0), image, label, aug_for(), SOURCE, taps=257)
