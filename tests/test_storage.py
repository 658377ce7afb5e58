"""Storage forms of the prepared datasets: `raw` reads back what `encoded` reads, pixel for
pixel, in NumPy and TensorFlow; each form keeps its own folder; mixing them is refused."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from pne_jax import datasets as data
from pne_jax import input_pipeline
from pne_jax.configs import common, validation
from pne_jax.datasets import raw_pixels
from pne_jax.datasets.preparation import prepare
from pne_jax.datasets.semseg import StorageFormError
from tests.test_datasets import FAKES, SIZES, write_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the record ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (9, 1), (17, 23), (5, 6, 3), (1, 4, 3), (8, 2, 1)]
)
def test_record_round_trip_numpy_and_tensorflow(shape):
    import tensorflow as tf

    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    array.flat[:2] = (255, 0)  # deltas that wrap both ways
    record = raw_pixels.encode(array)
    assert record[:4] == b"PNER" and len(record) == 16 + array.size
    squeeze = array.ndim == 2
    back = raw_pixels.decode(record, squeeze=squeeze)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, array if squeeze else array.reshape(*shape[:2], -1))
    channels = None if squeeze else shape[2]
    tf_back = raw_pixels.decode_tf(tf.constant(record), channels).numpy()
    np.testing.assert_array_equal(tf_back, back)


def test_record_deltas_are_row_differences():
    """The stored bytes are PNG's "up" filter (closed form), so zstd sees smooth images as
    runs of small values."""
    array = np.array([[10, 250], [5, 4], [5, 4]], np.uint8)
    record = raw_pixels.encode(array)
    assert list(record[16:]) == [10, 250, 251, 10, 0, 0]


def test_damaged_or_foreign_records_refused():
    record = raw_pixels.encode(np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="damaged; prepare it again"):
        raw_pixels.decode(record[:-1])
    with pytest.raises(ValueError, match="another form"):
        raw_pixels.decode(b"\x89PNG\r\n\x1a\n" + record[8:])
    with pytest.raises(ValueError, match="uint8"):
        raw_pixels.encode(np.zeros((4, 5), np.int32))


# --- prepared forms ----------------------------------------------------------------------------


def _prepare_both(name, tmp_path):
    trees = FAKES[name](np.random.default_rng(0), h=24, w=32)
    if name == "coco_stuff164k":  # a CMYK JPEG, converted to an RGB PNG when prepared
        cmyk = np.random.default_rng(1).integers(0, 256, (24, 32, 4), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(cmyk, "CMYK").save(buf, format="JPEG")
        trees["train2017.zip"]["train2017/000000000030.jpg"] = buf.getvalue()
    manual = write_tree(trees, tmp_path / "manual", "zip")
    sizes = SIZES[name]
    encoded = prepare(name, tmp_path / "tfds", manual, expected_split_sizes=sizes)
    raw = prepare(name, tmp_path / "tfds", manual, expected_split_sizes=sizes, storage="raw")
    return encoded, raw, sizes


@pytest.mark.parametrize("name", ["cityscapes", "coco_stuff164k"])  # PNG; JPEG, grey, CMYK
def test_raw_form_reads_back_the_encoded_pixels(name, tmp_path, capsys):
    encoded, raw, sizes = _prepare_both(name, tmp_path)
    root = tmp_path / "tfds"
    assert encoded.data_path == root / encoded.name / "1.0.0"  # the default keeps its path
    assert raw.data_path == root / f"{encoded.name}_raw" / "1.0.0"
    assert raw.info.metadata["storage"] == "raw" and encoded.info.metadata["storage"] == "encoded"
    assert type(raw.info.features["image"]).__name__ == "RawPixels"
    for builder, level in ((encoded, "zstd:3"), (raw, "zstd:1")):  # tfds's options; ours
        shards = [os.fspath(p) for p in builder.data_path.iterdir() if ".array_record" in p.name]
        assert len(shards) == len(sizes)
        for shard in shards:
            options = ArrayRecordReader(shard).writer_options_string().split(",")
            assert "group_size:1" in options and level in options
    options = dict(expected_split_sizes=sizes)
    for split in sizes:
        a = data.data_source(name, split, root, **options)
        b = data.data_source(name, split, root, storage="raw", **options)
        tf_b = data.tf_dataset(name, split, root, storage="raw", **options)
        assert len(a) == len(b) == sizes[split]
        for i, tf_ex in enumerate(tf_b.as_numpy_iterator()):
            for key in ("image", "label"):
                assert b[i][key].dtype == np.uint8 and b[i][key].shape == a[i][key].shape
                np.testing.assert_array_equal(b[i][key], a[i][key])
                np.testing.assert_array_equal(tf_ex[key], a[i][key])
            assert b[i]["name"] == a[i]["name"] == tf_ex["name"]
    # Idempotent: a second preparation of the raw form does nothing.
    mtimes = {p: os.stat(p).st_mtime_ns for p in raw.data_path.iterdir()}
    capsys.readouterr()
    prepare(name, root, tmp_path / "manual", expected_split_sizes=sizes, storage="raw")
    assert "already prepared" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in raw.data_path.iterdir()} == mtimes


def test_forms_never_mix(tmp_path):
    name, sizes = "cityscapes", SIZES["cityscapes"]
    manual = write_tree(FAKES[name](np.random.default_rng(0)), tmp_path / "manual", "zip")
    root = tmp_path / "tfds"
    encoded = prepare(name, root, manual, expected_split_sizes=sizes)
    # Read as raw: refused, naming where the encoded form is and the command that fixes it.
    with pytest.raises(data.NotPreparedError) as e:
        data.data_source(name, "train", root, storage="raw", expected_split_sizes=sizes)
    message = str(e.value)
    assert "prepared in the 'encoded' storage form" in message and str(encoded.data_path) in message
    assert f"--dataset=cityscapes --data_dir={root} --manual_dir=DIR --storage=raw" in message
    assert "config.data.storage='encoded'" in message and "\n" not in message
    # A folder moved by hand into the other form's place is refused when read and prepared.
    raw_path = root / f"{encoded.name}_raw" / "1.0.0"
    shutil.copytree(encoded.data_path, raw_path)
    with pytest.raises(StorageFormError, match="stored as 'encoded', but 'raw' was asked for"):
        data.data_source(name, "train", root, storage="raw", expected_split_sizes=sizes)
    with pytest.raises(StorageFormError, match="stored as 'encoded', but 'raw'"):
        prepare(name, root, manual, expected_split_sizes=sizes, storage="raw")
    with pytest.raises(StorageFormError, match="unknown storage form 'png'; use one of encoded"):
        data.make_builder(name, root, storage="png")


def test_prepare_command_storage_flag(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    base = [sys.executable, "-m", "pne_jax", "prepare", "--dataset=synthetic"]
    base += [f"--data_dir={tmp_path}", "--num_train=2", "--num_validation=1"]
    base += ["--height=32", "--width=48"]
    done = subprocess.run(base + ["--storage=raw"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "synthetic_semseg_raw" / "seed0-train2-val1-32x48" / "1.0.0").is_dir()
    assert not (tmp_path / "synthetic_semseg").exists()
    bad = subprocess.run(base + ["--storage=png"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--storage" in bad.stderr and "<encoded|raw>" in bad.stderr


# --- the trainer reads either form -------------------------------------------------------------


def _synthetic_config(tmp_path, storage):
    config = ml_collections.ConfigDict(
        {
            "data": common.data(
                "synthetic", base_size=(48, 32), crop_size=(24, 32), test_size=(48, 32)
            )
        }
    )
    config.data.data_dir = str(tmp_path)
    config.data.options = dict(num_train=6, num_validation=2, height=32, width=48)
    config.data.storage = storage
    config.data.num_workers = 0
    config.train = {"global_batch_size": 4}
    return config


def test_training_batches_equal_in_both_forms(tmp_path):
    options = dict(num_train=6, num_validation=2, height=32, width=48)
    for storage in data.STORAGE_FORMS:
        prepare("synthetic", tmp_path, storage=storage, **options)
    batches = {}
    for storage in data.STORAGE_FORMS:
        it = input_pipeline.train_iterator(_synthetic_config(tmp_path, storage), start_step=3)
        batches[storage] = next(it)
        it.close()
    for key in ("image", "label"):
        np.testing.assert_array_equal(batches["raw"][key], batches["encoded"][key])


def test_config_storage_validated():
    from pne_jax import configs

    config = configs.get_config("demo")
    assert config.data.storage == data.DEFAULT_STORAGE == "encoded"
    config.data.storage = "png"
    with pytest.raises(validation.ConfigError, match=r"config.data.storage='png': must be one of"):
        validation.check(config)
    config.data.storage = "raw"
    validation.check(config)
    config.data.name = "my_tfds_dataset"
    with pytest.raises(validation.ConfigError, match="applies to pne-jax's datasets"):
        validation.check(config)
