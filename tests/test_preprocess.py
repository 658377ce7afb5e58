"""The device-side evaluation preprocessing (`pne_jax.preprocess`) against the host's
(`augment.eval_transform`: MMCV's size rule, PIL's bilinear resize, the normalisation)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pne_jax import augment, preprocess

TEST_SIZES = [(2048, 1024), (2048, 512), (256, 128), (96, 48), (1333, 800)]


@pytest.mark.parametrize("test_size", TEST_SIZES)
def test_sizes_follow_mmcv_but_round_exact_halves_up(test_size):
    hs, ws = np.meshgrid(np.arange(1, 1201), np.arange(1, 1201), indexing="ij")
    sizes = np.stack([hs.ravel(), ws.ravel()], -1)
    got = np.asarray(jax.jit(preprocess.keep_ratio_sizes, static_argnums=1)(sizes, test_size))
    # MMCV's rule in float64, vectorised (augment.keep_ratio_size, one size at a time, is
    # checked on the sizes that differ and on a sample).
    long_edge, short_edge = max(test_size), min(test_size)
    factor = np.minimum(long_edge / sizes.max(-1), short_edge / sizes.min(-1))[:, None]
    mmcv = np.maximum((sizes * factor + 0.5).astype(np.int64), 1)
    for i in np.random.default_rng(0).choice(len(sizes), 200, replace=False):
        assert augment.keep_ratio_size(tuple(sizes[i]), test_size) == tuple(mmcv[i])
    differ = (got != mmcv).any(-1)
    for i in np.flatnonzero(differ):
        exact = sizes[i] * factor[i]  # MMCV's float lands just below an exact half
        assert tuple(got[i]) != augment.keep_ratio_size(tuple(sizes[i]), test_size)
        assert (np.abs(exact + 0.5 - got[i]) < 1e-9).any() and (got[i] - mmcv[i] <= 1).all()
    assert differ.mean() < 1e-4
    assert preprocess.resized_size((55, 704), (96, 48)) == (8, 96)  # MMCV: (7, 96)


def _image(h, w, seed, blocks):
    rng = np.random.default_rng(seed)
    if not blocks:
        return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    coarse = rng.integers(0, 256, (-(-h // 4), -(-w // 4), 3))
    return np.kron(coarse, np.ones((4, 4, 1)))[:h, :w].astype(np.uint8)


@pytest.mark.parametrize(
    "size,test_size",
    [
        ((40, 60), (96, 48)),  # enlarged by 1.2
        ((200, 333), (96, 48)),  # shrunk by 4: antialiased, a 9-pixel window
        ((77, 300), (96, 48)),  # shrunk, a thin image
        ((64, 96), (256, 128)),  # enlarged by 2
        ((96, 48), (96, 48)),  # kept as it is
        ((480, 640), (2048, 512)),  # ADE20K's rule
    ],
)
def test_resize_and_normalisation_equal_the_host_to_one_level(size, test_size):
    h, w = size
    for seed, blocks in [(0, True), (1, False)]:
        image = _image(h, w, seed, blocks)
        want = augment.eval_transform(image, test_size)
        nh, nw = want.shape[:2]
        bucket, canvas = (h + 5, w + 7), (nh + 3, nw + 2)  # padded: the padding is unseen
        images = np.full((1, *bucket, 3), 200, np.uint8)
        images[0, :h, :w] = image
        batch = jax.jit(preprocess.eval_batch, static_argnums=(2, 3))(
            images, np.array([[h, w]]), test_size, canvas
        )
        np.testing.assert_array_equal(batch["image_size"], [[nh, nw]])
        np.testing.assert_array_equal(batch["label_size"], [[h, w]])
        got = np.asarray(batch["image"])[0]
        assert (got[nh:] == 0).all() and (got[:, nw:] == 0).all()
        levels = np.abs(got[:nh, :nw] - want) * np.asarray(augment.IMAGENET_STD, np.float32)
        assert levels.max() < 1 + 1e-3  # one level of 255 at most
        off = levels > 1e-3
        assert off.mean() < 0.06, off.mean()  # enlarging by 1.2 makes exact halves common
        if (h, w) == (nh, nw):
            assert not off.any()  # nothing resized: exact


def test_a_batch_resizes_each_image_by_its_own_sizes():
    """Images that keep their width beside one that does not (one pass copies for none), and
    a batch where no image changes size (both passes copy)."""
    images = [_image(40, 60, 2, False), _image(96, 48, 3, False), _image(30, 48, 4, True)]
    bucket = (96, 64)
    batch = np.zeros((3, *bucket, 3), np.uint8)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = image
    sizes = np.array([image.shape[:2] for image in images], np.int32)
    resize = jax.jit(preprocess.resize_images, static_argnums=3)
    for chosen in ([0, 1, 2], [1]):
        new = np.asarray(preprocess.keep_ratio_sizes(sizes[chosen], (96, 48)))
        got = np.asarray(resize(batch[chosen], sizes[chosen], new, (96, 96)))
        for row, i in enumerate(chosen):
            want = augment.resize_image(images[i], tuple(new[row])).astype(np.float32)
            h, w = want.shape[:2]
            assert np.abs(got[row, :h, :w] - want).max() <= 1
            assert (got[row, h:] == 0).all() and (got[row, :, w:] == 0).all()
    np.testing.assert_array_equal(got[0, :96, :48], images[1])  # copied: exact
