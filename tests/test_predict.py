"""Prediction on image files, from a tiny demo checkpoint trained here (one step of
configs/demo.py on a 16-image synthetic set, 64x64 crops, without the PNE term, which only
adds compile time here): outputs equal evaluation's predictions, Cityscapes submission names
and ids follow cityscapesScripts, bad inputs are reported."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from pne_jax import Segmenter, evaluate, input_pipeline, predict, train, visualize
from pne_jax.configs import demo
from pne_jax.datasets.images import UnsupportedImageError
from pne_jax.models import build_model
from tests import compilation_cache
from tests.test_datasets import grey16_gradient, high_byte, palette_with_alpha, png16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VALIDATION = 4
# cityscapesScripts, cityscapesscripts/helpers/labels.py: the label id of each trainId 0..18
# (road 7, sidewalk 8, building 11, wall 12, fence 13, pole 17, traffic light 19, traffic
# sign 20, vegetation 21, terrain 22, sky 23, person 24, rider 25, car 26, truck 27, bus 28,
# train 31, motorcycle 32, bicycle 33).
# fmt: off
OFFICIAL_TRAIN_TO_LABEL_ID = [
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
]
# fmt: on
TINY = {
    "train.steps": 1,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "train.eval_every": 1000,
    "data.num_workers": 0,
    "data.crop_size": (64, 64),
    "data.options.num_train": 16,
    "data.options.num_validation": NUM_VALIDATION,
    "eval.global_batch_size": NUM_VALIDATION,
    "pne.enabled": False,
}


def _name(i: int) -> str:
    return f"frankfurt_000000_{i:06d}_leftImg8bit.png"


def _tiny_config(data_dir: str):
    config = demo.get_config()
    config.data.data_dir = data_dir
    config.update_from_flattened_dict(TINY)
    return config


def _env():
    return dict(
        os.environ,
        **compilation_cache.ENV,
        PYTHONPATH=ROOT,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, variables, workdir, folder of the validation images as PNG files)."""
    from pne_jax.datasets import data_source, prepare

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    options = dict(num_train=16, num_validation=NUM_VALIDATION, height=128, width=256, seed=0)
    prepare("synthetic", data_dir, **options)
    workdir = str(tmp_path_factory.mktemp("demo"))
    # As tests/test_train.py: main.py in a subprocess on one CPU device (compiles faster
    # than the 8 simulated devices of this process).
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/demo.py"]
    command += [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--mode=train"]
    command += [f"--config.{key}={value}" for key, value in TINY.items()]
    subprocess.run(command, env=_env(), cwd=ROOT, check=True, timeout=600)
    config = _tiny_config(data_dir)
    variables, step = train.load_variables(config, workdir)
    assert step == 1
    images = tmp_path_factory.mktemp("images")
    source = data_source("synthetic", "validation", data_dir, **options)
    for i in range(NUM_VALIDATION):
        Image.fromarray(np.asarray(source[i]["image"])).save(images / _name(i))
    return config, variables, workdir, str(images)


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
    """predict_images on the validation PNGs plus a larger JPEG, batches of 2."""
    config, variables, _, images = trained
    rng = np.random.default_rng(0)
    big = os.path.join(images, "big.jpg")  # larger than any validation image: other shapes
    Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8)).save(big)
    paths = [os.path.join(images, _name(i)) for i in range(NUM_VALIDATION)] + [big]
    out = str(tmp_path_factory.mktemp("predictions"))
    failures = predict.predict_images(config, variables, paths, out, batch_size=2)
    assert failures == []
    return out


def test_label_pngs_equal_evaluation_predictions(trained, predicted):
    config, variables, _, _ = trained
    batch = input_pipeline.eval_dataset(config)[0]  # all validation images, eval format
    model = build_model(config.model)
    predict_batch = jax.jit(
        lambda v, b: evaluate.predict_batch(model, v, b, b["label"].shape[1:3], config.eval)
    )
    want = np.asarray(predict_batch(variables, batch))
    # The comparison can fail: an input one pixel off changes the predicted maps.
    shifted = dict(batch, image=np.roll(batch["image"], 1, axis=2))
    assert (np.asarray(predict_batch(variables, shifted)) != want).any()
    for i in range(NUM_VALIDATION):
        stem = os.path.join(predicted, _name(i)[:-4])
        label = np.asarray(Image.open(stem + ".png"))
        assert label.dtype == np.uint8 and label.shape == tuple(batch["label_size"][i])
        np.testing.assert_array_equal(label, want[i, : label.shape[0], : label.shape[1]])


def test_colour_and_overlay_pngs(trained, predicted):
    _, _, _, images = trained
    colours = visualize.palette("synthetic")
    for stem, source in [(_name(0)[:-4], os.path.join(images, _name(0))), ("big", None)]:
        label = np.asarray(Image.open(os.path.join(predicted, stem + ".png")))
        colored = np.asarray(Image.open(os.path.join(predicted, stem + "_color.png")))
        np.testing.assert_array_equal(colored, visualize.colorize(label, colours))
        overlaid = np.asarray(Image.open(os.path.join(predicted, stem + "_overlay.png")))
        assert overlaid.shape == colored.shape
        if source is not None:
            image = np.asarray(Image.open(source).convert("RGB"))
            np.testing.assert_array_equal(overlaid, visualize.overlay(image, colored))
    assert np.asarray(Image.open(os.path.join(predicted, "big.png"))).shape == (150, 300)
    assert len(os.listdir(predicted)) == 3 * (NUM_VALIDATION + 1)


def test_train_ids_to_cityscapes_label_ids():
    lut = predict.cityscapes_train_to_label_id()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[:19].tolist() == OFFICIAL_TRAIN_TO_LABEL_ID
    assert lut[19:].max() == 0


def test_cityscapes_submission_names():
    name = predict.cityscapes_submission_name
    assert name("test/berlin/berlin_000000_000019_leftImg8bit.png") == (
        "berlin_000000_000019_leftImg8bit.png"
    )
    assert name("munster_000123_000456_leftImg8bit.jpg") == "munster_000123_000456_leftImg8bit.png"
    assert name("bonn_000001_000002.png") == "bonn_000001_000002_leftImg8bit.png"
    for bad in ("photo.png", "berlin_0000_000019_leftImg8bit.png", "berlin_000000_0000190.png"):
        with pytest.raises(ValueError, match="not a Cityscapes file name"):
            name(bad)


def test_cityscapes_submission(trained, predicted, tmp_path):
    config, variables, _, images = trained
    paths = [os.path.join(images, _name(i)) for i in range(NUM_VALIDATION)]
    out = str(tmp_path / "submission")
    failures = predict.predict_images(
        config, variables, paths, out, batch_size=NUM_VALIDATION, cityscapes_submission=True
    )
    assert failures == []
    files = sorted(os.listdir(out))
    assert files == [_name(i) for i in range(NUM_VALIDATION)]  # nothing else in the folder
    official = np.array(OFFICIAL_TRAIN_TO_LABEL_ID, np.uint8)
    for i in range(NUM_VALIDATION):
        train_ids = np.asarray(Image.open(os.path.join(predicted, _name(i)[:-4] + ".png")))
        label_ids = np.asarray(Image.open(os.path.join(out, _name(i))))
        assert label_ids.dtype == np.uint8
        np.testing.assert_array_equal(label_ids, official[train_ids])
        # evalPixelLevelSemanticLabeling's getPrediction: exactly one file matches the ground
        # truth's `<city>_<seq>_<frame>*.png`.
        pattern = f"frankfurt_000000_{i:06d}*.png"
        assert fnmatch.filter(files, pattern) == [_name(i)]


def test_read_image_converts_modes_by_the_preparation_rule(tmp_path):
    """16-bit greyscale: v >> 8 (not white), as the same picture in a 48-bit RGB PNG reads;
    RGBA, LA and palette-with-alpha: alpha dropped, colours kept; float: refused."""
    rng = np.random.default_rng(0)
    gradient = grey16_gradient(16, 32)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(gradient).save(grey16)
    rgb48 = tmp_path / "rgb48.png"
    rgb48.write_bytes(png16(np.repeat(gradient[..., None], 3, -1)))
    image = predict.read_image(str(grey16))
    assert image.dtype == np.uint8 and image.shape == (16, 32, 3)
    np.testing.assert_array_equal(image, np.repeat(high_byte(gradient)[..., None], 3, -1))
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) == 256
    np.testing.assert_array_equal(predict.read_image(str(rgb48)), image)

    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    la = rng.integers(0, 256, (5, 6, 2), dtype=np.uint8)
    p_bytes, p_rgb = palette_with_alpha(rng, 5, 6)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    (tmp_path / "p.png").write_bytes(p_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on a palette with alpha converted directly
        np.testing.assert_array_equal(predict.read_image(str(tmp_path / "p.png")), p_rgb)
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "rgba.png")), rgba[..., :3])
    want_la = np.repeat(la[..., :1], 3, -1)
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "la.png")), want_la)

    floats = str(tmp_path / "float.tif")
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "F").save(floats)
    with pytest.raises(UnsupportedImageError) as err:
        predict.read_image(floats)
    assert str(err.value).startswith(f"{floats} has image mode 'F' (32-bit float)")
    assert "convert the file to 8-bit RGB" in str(err.value)


def test_batch_size_is_the_evaluation_one():
    config = demo.get_config()
    config.eval.global_batch_size = 8
    assert predict.prediction_batch_size(config, 20) == 8
    assert predict.prediction_batch_size(config, 3) == 3  # capped at the number of images
    assert predict.prediction_batch_size(config, 3, batch_size=5) == 5  # asked for: as asked
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        predict.prediction_batch_size(config, 3, batch_size=0)
    del config.eval["global_batch_size"]
    missing = r"^config\.eval\.global_batch_size is missing.*; or pass --batch_size$"
    with pytest.raises(ValueError, match=missing):
        predict.prediction_batch_size(config, 3)
    # predict_images refuses such a config before it reads (or fails on) any image.
    with pytest.raises(ValueError, match=r"config\.eval\.global_batch_size is missing"):
        predict.predict_images(config, None, ["/nonexistent/a.png"], "/nonexistent/out")
    assert predict.prediction_batch_size(config, 3, batch_size=2) == 2


def test_glob_matching_nothing_names_the_glob(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.png")
    with pytest.raises(FileNotFoundError, match=r"--images=.*nothing/\*\.png.* matches no file"):
        predict.find_images(pattern)


def test_cli_reports_unreadable_images_and_writes_the_rest(trained, tmp_path):
    """The CLI in a subprocess: one good, one undecodable and one truncated image; a config
    override on the command line."""
    config, _, workdir, images = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = Image.open(os.path.join(images, _name(0)))
    good.save(inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"this is not a PNG")
    data = (inputs / "good.png").read_bytes()
    (inputs / "truncated.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pne_jax.predict",
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            f"--images={inputs}/*.png",
            f"--out={out}",
            f"--config.data.data_dir={config.data.data_dir}",
            "--config.data.crop_size=(64, 64)",
            "--config.eval.checkpoint=1",
        ],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "2 of 3 images failed" in result.stderr, result.stderr
    for name in ("broken.png", "truncated.png"):
        assert f"{inputs / name}:" in result.stderr
    assert "wrote the predictions of 1 of 3 images" in result.stdout
    assert sorted(os.listdir(out)) == ["good.png", "good_color.png", "good_overlay.png"]
    label = np.asarray(Image.open(out / "good.png"))
    assert label.shape == (128, 256) and label.max() < 10


def test_segmenter_from_a_workdir_or_a_checkpoint(trained, predicted, tmp_path):
    """The Segmenter of a run: the checkpoint's variables and the config it was trained
    with; its labels are the predict command's PNGs (one inference path)."""
    config, variables, workdir, images = trained
    segmenter = Segmenter.from_workdir(workdir)
    assert segmenter.config.model.to_dict() == config.model.to_dict()
    assert tuple(segmenter.config.data.test_size) == tuple(config.data.test_size)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, segmenter.variables, variables)))
    step_dir = os.path.join(workdir, "checkpoints", "1")
    from_step = Segmenter.from_checkpoint(config, step_dir)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, from_step.variables, variables)))
    path = os.path.join(images, _name(0))
    label = segmenter.segment(path)
    np.testing.assert_array_equal(
        label, np.asarray(Image.open(os.path.join(predicted, _name(0)[:-4] + ".png")))
    )
    other = _tiny_config(config.data.data_dir)
    other.model.num_classes = 5
    with pytest.raises(ValueError, match="conv_seg"):
        Segmenter.from_checkpoint(other, workdir)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7 .* saved steps: \\[1\\]"):
        Segmenter.from_workdir(workdir, step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        Segmenter.from_workdir(str(tmp_path))


def test_export_cli_on_a_workdir(trained, predicted, tmp_path):
    """`pne-jax export` on a run, then the exported model run by its own runtime (in this
    process, so it is not fresh: tests/test_export.py runs it where pne-jax is not): the
    predict command's labels. Bad flags are one line each."""
    _, _, workdir, images = trained
    out = tmp_path / "exported"

    def export(*flags):
        command = [sys.executable, "-m", "pne_jax", "export", f"--workdir={workdir}", *flags]
        return subprocess.run(
            command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
        )

    result = export(f"--out={out}", "--sizes=128x256", "--formats=stablehlo")
    assert result.returncode == 0, result.stderr
    assert f"exported StableHLO for cpu to {out}" in result.stdout
    assert not (out / "saved_model").exists()
    spec = importlib.util.spec_from_file_location("pne_exported", out / "pne_exported.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    model = runtime.load(str(out))
    for i in range(NUM_VALIDATION):
        image = np.asarray(Image.open(os.path.join(images, _name(i))))
        want = np.asarray(Image.open(os.path.join(predicted, _name(i)[:-4] + ".png")))
        np.testing.assert_array_equal(model.segment(image), want)
    for flags, message in [
        ([f"--out={out}"], "is not empty: export into a new folder"),
        ([f"--out={tmp_path / 'a'}", "--sizes=128by256"], "'128by256' is not HEIGHTxWIDTH"),
    ]:
        result = export(*flags)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, result.stderr
