"""Parity with MMSegmentation 1.2.2 itself (opt-in: `make parity`).

Each paper model is built by MMSegmentation from its own config file (random weights,
randomised BatchNorm/LayerNorm statistics and affine parameters), its state dict is
converted by `mmseg_weights.convert_model` into the model our shipped config builds, and
both run the same images: decode and auxiliary logits must agree to a relative 1e-4 in
float32, at a size that is a multiple of 32 and one that is not.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.parity

SIZES = {
    "deeplabv3_r101": ((128, 256), (100, 200)),
    "fcn_hr48": ((128, 256), (100, 200)),
    "ocrnet_hr48": ((128, 256), (100, 200)),
    "upernet_swin_t": ((224, 224), (100, 150)),
    "upernet_swin_b": ((192, 192), (100, 150)),
}


def _mmseg_logits(model, image):
    """(decode logits, aux logits or None) at feature resolution, eval mode."""
    import torch

    with torch.no_grad():
        feats = model.extract_feat(torch.from_numpy(image))
        if isinstance(model.decode_head, torch.nn.ModuleList):  # OCRNet's cascade
            first = model.decode_head[0].forward(feats)
            return model.decode_head[1].forward(feats, first).numpy(), first.numpy()
        aux = model.auxiliary_head.forward(feats).numpy() if model.with_auxiliary_head else None
        return model.decode_head.forward(feats).numpy(), aux


@pytest.mark.parametrize("name", list(SIZES))
def test_logits_equal_mmsegmentation(name):
    import jax.numpy as jnp
    import torch

    from pne_jax import configs, mmseg_weights
    from pne_jax.models import build_model
    from tests.mmseg_compat import PAPER_MODELS, build
    from tests.timm_compat import randomize_norms, relative_error, state_dict_numpy

    torch.manual_seed(0)
    torch.set_num_threads(2)
    mm_config, our_config = PAPER_MODELS[name]
    reference = build(mm_config).eval()
    randomize_norms(reference)
    config = configs.get_config(our_config)
    variables, fresh = mmseg_weights.convert_model(config.model, state_dict_numpy(reference))
    assert fresh and all("/projection/" in f for f in fresh)
    model = build_model(config.model)
    for size in SIZES[name]:
        image = np.random.default_rng(1).standard_normal((1, 3, *size)).astype(np.float32)
        want, want_aux = _mmseg_logits(reference, image)
        init = model.init(__import__("jax").random.key(0), jnp.zeros((1, *size, 3)))
        full = {"params": {**init["params"], **variables["params"]}}
        full["batch_stats"] = {**init["batch_stats"], **variables["batch_stats"]}
        got = model.apply(full, jnp.asarray(image.transpose(0, 2, 3, 1)))
        for key, ref in (("logits", want), ("aux_logits", want_aux)):
            if ref is None:
                assert got[key] is None
                continue
            ref = ref.transpose(0, 2, 3, 1)
            assert got[key].shape == ref.shape, (key, got[key].shape, ref.shape)
            error = relative_error(got[key], ref)
            print(f"{name} {size} {key}: relative error {error:.2e}")
            assert error <= 1e-4, (key, size, error)


TRAIN_SIZE = (64, 128)


def _mmseg_step(reference, images, labels, dtype):
    """MMSegmentation's loss and one SGD step (a copy of `reference`, in `dtype`): (loss,
    the state dict after the step as float64 NumPy)."""
    import copy

    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = copy.deepcopy(reference).to(dtype)
    samples = [
        SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(lb[None]))) for lb in labels
    ]
    loss, _ = model.parse_losses(model.loss(torch.from_numpy(images).to(dtype), samples))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    return float(loss), state


@pytest.mark.parametrize("name", ["deeplabv3_r101", "fcn_hr48", "ocrnet_hr48"])
def test_one_training_step_equals_mmsegmentation(name):
    """One SGD step in train mode from the same weights: BatchNorm on batch statistics (and
    its running statistics: unbiased variance, OCRNet's first stage updated twice), the
    cross-entropy of the decode head + 0.4 x the auxiliary one averaged over all pixels,
    weight decay 5e-4 and momentum 0.9 at the poly schedule's first rate. Dropout is off
    on both sides (it draws other random numbers).

    Train-mode BatchNorm over 2 small images is ill-conditioned (ASPP's image pool
    normalises 2 values per channel), so MMSegmentation's own float32 step differs from
    its float64 step by up to ~1e-3 in the logits. Reference: MMSegmentation in float64;
    ours (float32) must be within 1e-4, or within 3x MMSegmentation's own float32 error
    where that is larger, for the loss and for every updated parameter and statistic."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import torch
    from flax import traverse_util

    from pne_jax import configs, mmseg_weights, optim, train
    from pne_jax.models import build_model
    from tests.mmseg_compat import PAPER_MODELS, build
    from tests.timm_compat import randomize_norms, relative_error, state_dict_numpy

    torch.manual_seed(0)
    torch.set_num_threads(2)
    mm_config, our_config = PAPER_MODELS[name]
    reference = build(mm_config).train()
    randomize_norms(reference)
    heads = list(reference.decode_head) if name == "ocrnet_hr48" else [reference.decode_head]
    if reference.with_auxiliary_head:
        heads.append(reference.auxiliary_head)
    for head in heads:
        head.dropout = None

    config = configs.get_config(our_config)
    config.pne.enabled = False
    config.model.projection.enabled = False
    config.model.dropout = 0.0
    if len(heads) > 1:  # an auxiliary head (OCRNet's is its first stage)
        config.model.aux_head = ml_collections.ConfigDict({"dropout": 0.0})
    config.data.crop_size = TRAIN_SIZE
    variables, _ = mmseg_weights.convert_model(config.model, state_dict_numpy(reference))

    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 3, *TRAIN_SIZE)).astype(np.float32)
    labels = rng.integers(0, 19, (2, *TRAIN_SIZE)).astype(np.int64)
    labels[:, :8] = 255  # ignored rows
    loss64, state64 = _mmseg_step(reference, images, labels, torch.float64)
    loss32, state32 = _mmseg_step(reference, images, labels, torch.float32)
    want = traverse_util.flatten_dict(mmseg_weights.convert_model(config.model, state64)[0])
    theirs = traverse_util.flatten_dict(mmseg_weights.convert_model(config.model, state32)[0])

    model = build_model(config.model)
    tx, schedule = optim.build_optimizer(config, variables["params"])
    state = train.TrainState(
        step=jnp.int32(0),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(jax.random.key(0)),
        bad_step=jnp.int32(-1),
        bad_parts=jnp.int32(0),
    )
    step = jax.jit(train.make_train_step(model, tx, schedule, config))
    batch = {"image": jnp.asarray(images.transpose(0, 2, 3, 1)), "label": jnp.asarray(labels)}
    new_state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    print(f"{name}: loss {loss:.7f}, mmseg float32 {loss32:.7f}, float64 {loss64:.7f}")
    loss_noise = abs(loss32 - loss64) / abs(loss64)
    assert abs(loss - loss64) / abs(loss64) <= max(1e-4, 3 * loss_noise)

    got = traverse_util.flatten_dict(
        {"params": new_state.params, "batch_stats": new_state.batch_stats}
    )
    before = traverse_util.flatten_dict(variables)
    assert set(got) == set(want)
    worst, ours_sq, theirs_sq, update_sq = [], 0.0, 0.0, 0.0
    for path, w in want.items():
        g, b = np.asarray(got[path], np.float64), np.asarray(before[path], np.float64)
        t = np.asarray(theirs[path], np.float64)
        worst.append((relative_error(g, w), relative_error(t, w), "/".join(path)))
        if path[0] == "params":
            ours_sq += float(np.sum((g - w) ** 2))
            theirs_sq += float(np.sum((t - w) ** 2))
            update_sq += float(np.sum((w - b) ** 2))
    ours_error, their_error, path = max(worst)
    print(f"{name}: worst value {path}: ours {ours_error:.2e}, mmseg float32 {their_error:.2e}")
    assert ours_error <= max(1e-4, 3 * their_error)
    # The whole update (every parameter at once): per-tensor gradients of deep layers are
    # float32 noise here on both sides (up to ~20% of their own update for MMSegmentation).
    ours_update, their_update = (np.sqrt(x / update_sq) for x in (ours_sq, theirs_sq))
    print(f"{name}: update error ours {ours_update:.2e}, mmseg float32 {their_update:.2e}")
    assert ours_update <= max(1e-3, 3 * their_update)


def test_metrics_equal_mmsegmentation():
    """mIoU, per-class IoU (NaN for a class absent from predictions and labels), aAcc and
    mAcc as MMSegmentation's IoUMetric computes them, over several images."""
    import jax.numpy as jnp
    import torch

    from pne_jax import metrics
    from tests.mmseg_compat import import_mmseg

    import_mmseg()
    from mmseg.evaluation.metrics import IoUMetric

    rng = np.random.default_rng(0)
    num_classes = 7
    areas = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
    total = np.zeros((num_classes, num_classes), np.int64)
    for _ in range(5):
        label = rng.choice([0, 1, 2, 3, 5, 255], size=(37, 53))  # 4 and 6 never labelled
        pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 6, label.shape))
        pred = np.where(pred == 255, 0, pred)  # class 6 never predicted either
        for i, area in enumerate(
            IoUMetric.intersect_and_union(
                torch.from_numpy(pred), torch.from_numpy(label), num_classes, 255
            )
        ):
            areas[i] += area.double()
        total += np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 7))
    want = IoUMetric.total_area_to_metrics(*areas, metrics=["mIoU"])
    got = metrics.segmentation_metrics(total)
    np.testing.assert_allclose(got["iou"], want["IoU"], rtol=1e-12)  # NaN where theirs is
    assert np.isnan(got["iou"][6]) and not np.isnan(got["iou"][4])
    np.testing.assert_allclose(got["acc"], want["Acc"], rtol=1e-12)
    assert got["aacc"] == pytest.approx(float(want["aAcc"]), rel=1e-12)
    assert got["miou"] == pytest.approx(float(np.nanmean(want["IoU"])), rel=1e-12)
    assert got["macc"] == pytest.approx(float(np.nanmean(want["Acc"])), rel=1e-12)


def test_slide_inference_equals_mmsegmentation():
    """`evaluate.slide_logits` on a padded batch of two images of different sizes equals
    MMSegmentation's `EncoderDecoder.slide_inference` on each image alone, for a
    stand-in model (a 3x3 convolution: its output depends on where the window is)."""
    import types

    import jax
    import jax.numpy as jnp
    import torch
    from mmengine import ConfigDict

    from pne_jax.evaluate import slide_logits
    from tests.mmseg_compat import import_mmseg

    import_mmseg()
    from mmseg.models.segmentors.encoder_decoder import EncoderDecoder

    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # OIHW, 4 classes

    def torch_model(crop, metas):
        return torch.nn.functional.conv2d(crop, torch.from_numpy(kernel), padding=1)

    def jax_model(crops):
        return jax.lax.conv_general_dilated(
            crops,
            jnp.asarray(kernel.transpose(2, 3, 1, 0)),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )

    sizes = [(50, 77), (41, 60)]
    canvas = np.zeros((2, 50, 77, 3), np.float32)
    images = [rng.standard_normal((*s, 3)).astype(np.float32) for s in sizes]
    for i, image in enumerate(images):
        canvas[i, : image.shape[0], : image.shape[1]] = image
    for crop, stride, per_step in (((32, 32), (21, 21), 1), ((40, 24), (13, 17), 3)):
        fake = types.SimpleNamespace(
            test_cfg=ConfigDict(crop_size=crop, stride=stride),
            out_channels=4,
            encode_decode=torch_model,
        )
        got = slide_logits(
            jax_model, jnp.asarray(canvas), jnp.asarray(sizes), crop, stride, per_step
        )
        for i, image in enumerate(images):
            x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
            with torch.no_grad():
                want = EncoderDecoder.slide_inference(fake, x, [{}])[0].numpy()
            h, w = sizes[i]
            np.testing.assert_allclose(
                np.asarray(got[i, :h, :w]), want.transpose(1, 2, 0), rtol=1e-5, atol=1e-5
            )


def test_poly_schedule_equals_mmcv():
    """The CNN configs' schedule (`common.sgd_poly`: poly, power 0.9, down to 1e-4) is
    MMCV 0.x's poly (the paper's MMSegmentation 0.13): (base - min) (1 - t / T)^0.9 + min.
    mmengine's PolyLR (MMSegmentation 1.x) computes the same recursively, but with
    `end=T` it decays over T - 1 steps (its total_iters is end - begin - 1): so it equals
    ours with `end=T + 1`, step by step, and reaches the minimum one step early in 1.x."""
    import ml_collections
    import torch
    from mmengine.optim.scheduler import PolyLR

    from pne_jax import optim
    from pne_jax.configs import common

    steps = 200
    config = ml_collections.ConfigDict(
        {"optimizer": common.sgd_poly(learning_rate=0.01), "train": {"steps": steps}}
    )
    schedule = optim.learning_rate_schedule(config, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    poly = PolyLR(opt, eta_min=1e-4, power=0.9, begin=0, end=steps + 1, by_epoch=False)
    for step in range(steps + 1):
        assert float(schedule(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5), step
        opt.step()
        poly.step()
    assert float(schedule(steps)) == pytest.approx(1e-4)


def _numpy_random_from(monkeypatch, gen):
    """numpy's global random functions that MMSegmentation's and MMCV's transforms call,
    drawing from `gen` in call order, as our augmentations draw from their Generator."""

    def randint(low, high=None, size=None):
        return int(gen.integers(low) if high is None else gen.integers(low, high))

    monkeypatch.setattr(np.random, "randint", randint)
    monkeypatch.setattr(
        np.random, "uniform", lambda low=0.0, high=1.0: float(gen.uniform(low, high))
    )
    monkeypatch.setattr(np.random, "random_sample", lambda: float(gen.random()))


def _photometric_steps(seed):
    """(saturation or hue applied) for a seed, replaying PhotoMetricDistortion's draws."""
    gen = np.random.default_rng(seed)
    if gen.integers(2):
        gen.uniform()
    mode = gen.integers(2)
    if mode == 1 and gen.integers(2):
        gen.uniform()
    saturation = bool(gen.integers(2)) and gen.uniform() is not None
    hue = bool(gen.integers(2))
    return saturation or hue


def test_photometric_distortion_equals_mmsegmentation(monkeypatch):
    """The same draws give the same brightness and contrast, exactly (uint8 truncation
    included); where saturation or hue applies, PIL's 8-bit HSV and OpenCV's differ by a
    few levels (the documented difference in `augment`)."""
    from pne_jax import augment
    from tests.mmseg_compat import import_mmseg

    import_mmseg()
    from mmseg.datasets.transforms import PhotoMetricDistortion

    transform = PhotoMetricDistortion()
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    exact = hsv = 0
    worst = 0.0
    for seed in range(200):
        _numpy_random_from(monkeypatch, np.random.default_rng(seed))
        want = transform.transform({"img": image[..., ::-1].copy()})["img"][..., ::-1]
        got = augment.photometric_distortion(np.random.default_rng(seed), image)
        if _photometric_steps(seed):
            hsv += 1
            worst = max(worst, float(np.abs(got.astype(float) - want).mean()))
        else:
            exact += 1
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    print(f"{exact} seeds exact, {hsv} with HSV: mean |difference| at most {worst:.2f} levels")
    assert exact > 20 and hsv > 100
    assert worst <= 3.0


def test_random_resize_and_crop_equal_mmsegmentation(monkeypatch):
    """RandomResize (scale drawn in `ratio_range`, keep-ratio size) and RandomCrop with
    `cat_max_ratio` retries take the same sizes and windows from the same draws."""
    from mmcv.transforms import RandomResize

    from pne_jax import augment
    from tests.mmseg_compat import import_mmseg

    import_mmseg()
    from mmseg.datasets.transforms import RandomCrop

    rng = np.random.default_rng(0)
    label = np.zeros((96, 160), np.uint8)  # mostly one class: most windows are unbalanced
    label[60:, 100:] = 1
    label[:20, :30] = 2
    label[rng.random(label.shape) < 0.2] = 255
    image = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    resize = RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True)
    crop = RandomCrop(crop_size=(48, 64), cat_max_ratio=0.75)
    retried = 0
    for seed in range(100):
        _numpy_random_from(monkeypatch, np.random.default_rng(seed))
        resized = resize.transform({"img": image, "img_shape": image.shape[:2]})["img"]
        gen = np.random.default_rng(seed)
        scale = augment.random_scale(gen, (2048, 1024), (0.5, 2.0))
        assert augment.keep_ratio_size(label.shape, scale) == resized.shape[:2], seed

        _numpy_random_from(monkeypatch, np.random.default_rng(seed))
        want = crop.transform({"img": image, "gt_seg_map": label, "seg_fields": ["gt_seg_map"]})
        gen = np.random.default_rng(seed)
        got_image, got_label = augment.random_crop(gen, image, label, (48, 64), 0.75)
        np.testing.assert_array_equal(got_label, want["gt_seg_map"], err_msg=f"seed {seed}")
        np.testing.assert_array_equal(got_image, want["img"])
        gen = np.random.default_rng(seed)
        first = (int(gen.integers(0, 96 - 48 + 1)), int(gen.integers(0, 160 - 64 + 1)))
        retried += not np.array_equal(
            got_label, label[first[0] : first[0] + 48, first[1] : first[1] + 64]
        )
    assert retried > 5  # the retries were exercised
