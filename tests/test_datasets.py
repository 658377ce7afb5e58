"""Dataset builders on small fake trees with the real layouts and file names; synthetic data.

Expected label maps are written out here independently of pne_jax/datasets/labels.py, from:
  Cityscapes: cityscapesScripts, cityscapesscripts/helpers/labels.py (id -> trainId).
  ADE20K: MMSegmentation, mmseg/datasets/ade.py (reduce_zero_label: 0 -> 255, k -> k - 1).
  COCO-Stuff-164k: MMSegmentation, tools/dataset_converters/coco_stuff164k.py (clsID_to_trID).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pne_jax import datasets as data
from pne_jax.datasets import labels
from pne_jax.datasets.manual import BadSourceFileError, MissingManualFilesError
from pne_jax.datasets.preparation import prepare
from pne_jax.datasets.semseg import SplitSizeError

REPO = Path(__file__).resolve().parents[1]
NO_DECODE = tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE

# --- independent expectations ----------------------------------------------------------------

# Cityscapes label ids of the 19 evaluated classes, in train-id order (road .. bicycle).
CITYSCAPES_EVAL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
# COCO category ids - 1 that COCO never uses; MMSeg's map is contiguous over the rest.
COCO_UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]


def cityscapes_expected(raw: int) -> int:
    return CITYSCAPES_EVAL_IDS.index(raw) if raw in CITYSCAPES_EVAL_IDS else 255


def ade20k_expected(raw: int) -> int:
    return 255 if raw == 0 else raw - 1


def coco_expected(raw: int) -> int:
    if raw == 255:
        return 255
    return raw - sum(u < raw for u in COCO_UNUSED)


def test_published_tables():
    # Well-known entries, stated directly.
    city = labels.CITYSCAPES_ID_TO_TRAIN_ID.as_dict()
    assert (city[7], city[26], city[0], city[33], city[9]) == (0, 13, 255, 18, 255)
    assert labels.CITYSCAPES.class_names[0] == "road" and labels.CITYSCAPES.class_names[13] == "car"
    assert labels.CITYSCAPES.palette[13] == (0, 0, 142)
    ade = labels.ADE20K_REDUCE_ZERO_LABEL.as_dict()
    assert (ade[0], ade[1], ade[150]) == (255, 0, 149)
    assert labels.ADE20K.class_names[:3] == ("wall", "building", "sky")
    assert labels.ADE20K.palette[0] == (120, 120, 120)
    coco = labels.COCO_STUFF_RAW_TO_TRAIN_ID.as_dict()
    assert (coco[0], coco[10], coco[12], coco[91], coco[181], coco[255]) == (
        0,
        10,
        11,
        80,
        170,
        255,
    )
    assert labels.COCO_STUFF164K.class_names[0] == "person"
    assert labels.COCO_STUFF164K.class_names[80] == "banner"  # first stuff class, raw id 91
    # Full tables against the expectations above.
    assert city == {i: cityscapes_expected(i) for i in range(34)}
    assert ade == {i: ade20k_expected(i) for i in range(151)}
    assert coco == {i: coco_expected(i) for i in [*range(182), 255] if i not in COCO_UNUSED}
    for name, n in (
        ("cityscapes", 19),
        ("ade20k", 150),
        ("coco_stuff164k", 171),
        ("synthetic", 10),
    ):
        meta = data.dataset_meta(name)
        assert meta.num_classes == len(meta.palette) == n and meta.ignore_index == 255


# --- fake trees ------------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _raw_label(rng, values: list[int], h: int, w: int, fixed: list[int] | None) -> np.ndarray:
    """Every value in `values` (h * w >= len(values)), shuffled; or `fixed`, tiled, in order."""
    if fixed is not None:
        return np.resize(np.asarray(fixed, np.uint8), (h, w))
    flat = np.resize(np.asarray(values, np.uint8), h * w)
    return rng.permutation(flat).reshape(h, w)


def fake_cityscapes(rng, h=8, w=12, fixed=None):
    """{zip name: {member: bytes}} like the two Cityscapes zips; ids 0..33 in every label."""
    leftimg, gtfine = {"README": b"fake"}, {"license.txt": b"fake"}
    cities = {"train": ["aachen", "aachen", "bochum"], "val": ["frankfurt"] * 2, "test": ["berlin"]}
    for split, names in cities.items():
        for k, city in enumerate(names):
            stem = f"{city}_{k:06d}_000019"
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            leftimg[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _encode(image, "PNG")
            raw = _raw_label(rng, list(range(34)), h, w, fixed)
            if split == "test":
                raw[:] = 0  # the official test "labels" are empty
            base = f"gtFine/{split}/{city}/{stem}_gtFine"
            gtfine[f"{base}_labelIds.png"] = _encode(raw, "PNG")
            gtfine[f"{base}_color.png"] = _encode(image, "PNG")  # must be ignored
            gtfine[f"{base}_polygons.json"] = b"{}"
    return {"leftImg8bit_trainvaltest.zip": leftimg, "gtFine_trainvaltest.zip": gtfine}


def fake_ade20k(rng, h=12, w=16, fixed=None):
    files = {"ADEChallengeData2016/objectInfo150.txt": b"fake"}
    for split, folder, n in (("train", "training", 3), ("val", "validation", 2)):
        for k in range(1, n + 1):
            stem = f"ADE_{split}_{k:08d}"
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            root = "ADEChallengeData2016"
            files[f"{root}/images/{folder}/{stem}.jpg"] = _encode(image, "JPEG")
            raw = _raw_label(rng, list(range(151)), h, w, fixed)
            files[f"{root}/annotations/{folder}/{stem}.png"] = _encode(raw, "PNG")
    return {"ADEChallengeData2016.zip": files}


def fake_coco(rng, h=12, w=16, fixed=None):
    trees = {"train2017.zip": {}, "val2017.zip": {}, "stuffthingmaps_trainval2017.zip": {}}
    raw_values = [v for v in [*range(182), 255] if v not in COCO_UNUSED]
    for folder, ids in (("train2017", (9, 25, 30)), ("val2017", (139, 285))):
        for k, image_id in enumerate(ids):
            stem = f"{image_id:012d}"
            # COCO has some greyscale JPEGs: they must come out as RGB.
            shape = (h, w) if k == 1 else (h, w, 3)
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            trees[f"{folder}.zip"][f"{folder}/{stem}.jpg"] = _encode(image, "JPEG")
            raw = _raw_label(rng, raw_values, h, w, fixed)
            trees["stuffthingmaps_trainval2017.zip"][f"{folder}/{stem}.png"] = _encode(raw, "PNG")
    return trees


FAKES = {"cityscapes": fake_cityscapes, "ade20k": fake_ade20k, "coco_stuff164k": fake_coco}
SIZES = {
    "cityscapes": {"train": 3, "validation": 2, "test": 1},
    "ade20k": {"train": 3, "validation": 2},
    "coco_stuff164k": {"train": 3, "validation": 2},
}
EXPECTED = {
    "cityscapes": cityscapes_expected,
    "ade20k": ade20k_expected,
    "coco_stuff164k": coco_expected,
}


def write_tree(trees: dict, manual: Path, layout: str) -> Path:
    """Writes the archives as zips, or as if each zip were extracted in `manual` ("unzipped"),
    or in MMSegmentation's COCO layout ("mmseg": images/..., annotations/...)."""
    manual.mkdir(parents=True, exist_ok=True)
    for zip_name, members in trees.items():
        if layout == "zip":
            with zipfile.ZipFile(manual / zip_name, "w") as zf:
                for member, content in members.items():
                    zf.writestr(member, content)
            continue
        for member, content in members.items():
            if layout == "mmseg":
                top = "annotations" if zip_name.startswith("stuff") else "images"
                member = f"{top}/{member}"
            (manual / member).parent.mkdir(parents=True, exist_ok=True)
            (manual / member).write_bytes(content)
    return manual


def source_members(trees: dict) -> dict[str, bytes]:
    return {m.rsplit("/", 1)[-1]: c for members in trees.values() for m, c in members.items()}


# --- real builders on fake trees -------------------------------------------------------------

CASES = [
    ("cityscapes", "zip"),
    ("cityscapes", "unzipped"),
    ("ade20k", "zip"),
    ("ade20k", "unzipped"),
    ("coco_stuff164k", "zip"),
    ("coco_stuff164k", "unzipped"),
    ("coco_stuff164k", "mmseg"),
]


@pytest.mark.parametrize("name,layout", CASES)
def test_prepare_fake_tree(name, layout, tmp_path, capsys):
    trees = FAKES[name](np.random.default_rng(0))
    manual = write_tree(trees, tmp_path / "manual", layout)
    builder = prepare(name, tmp_path / "tfds", manual, expected_split_sizes=SIZES[name])
    assert builder.is_prepared()
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == SIZES[name]

    features = builder.info.features
    assert features["image"].shape == (None, None, 3) and features["image"].np_dtype == np.uint8
    assert features["label"].shape == (None, None) and features["label"].np_dtype == np.uint8
    image_format = "png" if name == "cityscapes" else "jpeg"
    assert features["image"].encoding_format == image_format
    assert builder.info.file_format.value == "array_record"

    sources = source_members(trees)
    for split in SIZES[name]:
        # Random access through tfds itself, by the registered name.
        src = tfds.data_source(builder.name, split=split, data_dir=tmp_path / "tfds")
        raw_records = builder.as_data_source(split, deserialize_method=NO_DECODE)
        names = [src[i]["name"].decode() for i in range(len(src))]
        assert names == sorted(names)  # written in source order
        for i in range(len(src)):
            ex = src[i]
            stem = ex["name"].decode()
            ext = ".png" if name == "cityscapes" else ".jpg"
            source = Image.open(io.BytesIO(sources[stem + ext])).convert("RGB")
            np.testing.assert_array_equal(ex["image"], np.asarray(source))
            stored = raw_records[i].features.feature["image"].bytes_list.value[0]
            assert stored == sources[stem + ext]  # the source bytes, not re-encoded
            assert ex["label"].dtype == np.uint8 and ex["label"].shape == ex["image"].shape[:2]
            if split == "test":
                assert (ex["label"] == 255).all()
                continue
            label_key = {
                "cityscapes": stem.replace("_leftImg8bit", "_gtFine_labelIds") + ".png",
                "ade20k": stem + ".png",
                "coco_stuff164k": stem + ".png",
            }[name]
            raw = np.asarray(Image.open(io.BytesIO(sources[label_key])))
            expected = np.vectorize(EXPECTED[name])(raw)
            np.testing.assert_array_equal(ex["label"], expected)

    # A second run does nothing and says so.
    mtimes = {p: os.stat(p).st_mtime_ns for p in builder.data_path.iterdir()}
    capsys.readouterr()
    again = prepare(name, tmp_path / "tfds", manual, expected_split_sizes=SIZES[name])
    assert "already prepared" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in again.data_path.iterdir()} == mtimes


def test_known_entries_end_to_end(tmp_path):
    """Cityscapes id 7 -> 0, 26 -> 13, 0 -> 255; ADE 0 -> 255, 1 -> 0; COCO 0 -> 0, 91 -> 80."""
    cases = {
        "cityscapes": ([7, 26, 0], [0, 13, 255]),
        "ade20k": ([0, 1, 150], [255, 0, 149]),
        "coco_stuff164k": ([0, 91, 255], [0, 80, 255]),
    }
    for name, (raw, train) in cases.items():
        trees = FAKES[name](np.random.default_rng(1), h=2, w=3, fixed=raw)
        manual = write_tree(trees, tmp_path / name / "manual", "zip")
        prepare(name, tmp_path / name / "tfds", manual, expected_split_sizes=SIZES[name])
        src = data.data_source(
            name, "validation", tmp_path / name / "tfds", expected_split_sizes=SIZES[name]
        )
        for ex in src:
            np.testing.assert_array_equal(ex["label"], np.array([train, train], np.uint8))


# --- bad input -------------------------------------------------------------------------------


def test_missing_archives_named(tmp_path):
    trees = fake_cityscapes(np.random.default_rng(0))
    manual = write_tree(
        {"leftImg8bit_trainvaltest.zip": trees["leftImg8bit_trainvaltest.zip"]},
        tmp_path / "manual",
        "zip",
    )
    with pytest.raises(MissingManualFilesError) as err:
        prepare("cityscapes", tmp_path / "tfds", manual)
    msg = str(err.value)
    assert (
        "  - gtFine_trainvaltest.zip, or its extracted folder gtFine/" in msg and str(manual) in msg
    )
    assert "https://www.cityscapes-dataset.com" in msg and "  - leftImg8bit" not in msg

    with pytest.raises(MissingManualFilesError) as err:
        prepare("coco_stuff164k", tmp_path / "tfds", tmp_path / "nowhere")
    msg = str(err.value)
    for needed in ("train2017.zip", "val2017.zip", "stuffthingmaps_trainval2017.zip"):
        assert f"  - {needed}" in msg
    assert "does not exist" in msg and str(tmp_path / "nowhere") in msg and "cocodataset.org" in msg

    with pytest.raises(MissingManualFilesError, match="ADEChallengeData2016.zip"):
        prepare("ade20k", tmp_path / "tfds", manual)

    (manual / "gtFine_trainvaltest.zip").write_bytes(b"PK\x03\x04 partial download")
    with pytest.raises(BadSourceFileError, match="gtFine_trainvaltest.zip is not a readable zip"):
        prepare("cityscapes", tmp_path / "tfds", manual)
    assert not (tmp_path / "tfds" / "cityscapes_semseg" / "1.0.0").exists()


def test_unknown_label_value_named(tmp_path):
    trees = fake_ade20k(np.random.default_rng(0))
    member = "ADEChallengeData2016/annotations/training/ADE_train_00000002.png"
    raw = np.asarray(Image.open(io.BytesIO(trees["ADEChallengeData2016.zip"][member]))).copy()
    raw[0, 0] = 151
    trees["ADEChallengeData2016.zip"][member] = _encode(raw, "PNG")
    manual = write_tree(trees, tmp_path / "manual", "unzipped")
    with pytest.raises(BadSourceFileError, match=r"\[151\].*ADE_train_00000002\.png"):
        prepare("ade20k", tmp_path / "tfds", manual, expected_split_sizes=SIZES["ade20k"])

    coco = fake_coco(np.random.default_rng(0))  # an id COCO never uses is unknown too
    member = "val2017/000000000139.png"
    raw = np.asarray(Image.open(io.BytesIO(coco["stuffthingmaps_trainval2017.zip"][member]))).copy()
    raw[0, 0] = 11
    coco["stuffthingmaps_trainval2017.zip"][member] = _encode(raw, "PNG")
    manual = write_tree(coco, tmp_path / "coco", "zip")
    with pytest.raises(
        BadSourceFileError,
        match=r"\[11\].*stuffthingmaps_trainval2017.zip:val2017/000000000139.png",
    ):
        prepare(
            "coco_stuff164k",
            tmp_path / "tfds",
            manual,
            expected_split_sizes=SIZES["coco_stuff164k"],
        )


def test_split_sizes_checked(tmp_path, capsys, caplog):
    manual = write_tree(fake_ade20k(np.random.default_rng(0)), tmp_path / "manual", "zip")
    with pytest.raises(SplitSizeError) as err:
        prepare("ade20k", tmp_path / "tfds", manual)  # the published sizes by default
    assert "expected 20210, found 3" in str(err.value) and "expected 2000, found 2" in str(
        err.value
    )
    assert not data.make_builder("ade20k", tmp_path / "tfds").data_path.exists()

    # A subset on purpose (--nocheck_split_sizes): a later checking run refuses it.
    subset = prepare("ade20k", tmp_path / "tfds", manual, expected_split_sizes=None)
    recorded = data.make_builder("ade20k", tmp_path / "tfds").info.metadata  # metadata.json
    assert recorded["expected_split_sizes"] is None
    with pytest.raises(SplitSizeError) as err:
        prepare("ade20k", tmp_path / "tfds", manual)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(
        f"ade20k_semseg: the data prepared at {subset.data_path}"
    )
    assert "has train 3, validation 2, not the expected train 20210, validation 2000" in msg
    assert "a subset, prepared without the split-size check" in msg
    assert "pass --nocheck_split_sizes" in msg and f"delete {subset.data_path} and prepare" in msg
    capsys.readouterr()
    prepare("ade20k", tmp_path / "tfds", manual, expected_split_sizes=None)
    assert "already prepared" in capsys.readouterr().out
    # Reading it is allowed (training on a subset is a choice), with a warning.
    with caplog.at_level("WARNING"):
        assert len(data.data_source("ade20k", "train", tmp_path / "tfds")) == 3
    assert "not the expected train 20210, validation 2000" in caplog.text


def test_missing_files_name_dataset_and_expected_path(tmp_path):
    coco = fake_coco(np.random.default_rng(0))
    del coco["stuffthingmaps_trainval2017.zip"]["train2017/000000000025.png"]
    manual = write_tree(coco, tmp_path / "coco", "mmseg")
    with pytest.raises(BadSourceFileError) as err:
        prepare("coco_stuff164k", tmp_path / "tfds", manual)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("coco_stuff164k_semseg, split 'train': 1 image(s) without a label: ")
    image, label = (manual / f"{top}/train2017/000000000025" for top in ("images", "annotations"))
    assert f"{image}.jpg needs {label}.png (or 000000000025_labelTrainIds.png)" in msg

    city = fake_cityscapes(np.random.default_rng(0))
    stem = "val/frankfurt/frankfurt_000001_000019"
    del city["gtFine_trainvaltest.zip"][f"gtFine/{stem}_gtFine_labelIds.png"]
    manual = write_tree(city, tmp_path / "city", "zip")
    with pytest.raises(BadSourceFileError) as err:
        prepare("cityscapes", tmp_path / "tfds", manual)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cityscapes_semseg, split 'validation': 1 image(s)")
    assert f"needs {manual}/gtFine_trainvaltest.zip:gtFine/{stem}_gtFine_labelIds.png" in msg

    ade = fake_ade20k(np.random.default_rng(0))
    del ade["ADEChallengeData2016.zip"][
        "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
    ]
    manual = write_tree(ade, tmp_path / "ade", "unzipped")
    with pytest.raises(BadSourceFileError) as err:
        prepare("ade20k", tmp_path / "tfds", manual)
    root = manual / "ADEChallengeData2016"
    assert str(err.value).startswith("ade20k_semseg, split 'train': 1 label(s) without an image: ")
    assert (
        f"{root}/annotations/training/ADE_train_00000002.png needs "
        f"{root}/images/training/ADE_train_00000002.jpg" in str(err.value)
    )


def test_corrupt_image_named_and_nothing_half_written(tmp_path):
    trees = fake_cityscapes(np.random.default_rng(0))
    member = "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png"
    good = trees["leftImg8bit_trainvaltest.zip"][member]
    manual = write_tree(trees, tmp_path / "manual", "unzipped")
    (manual / member).write_bytes(good[: len(good) // 2])  # truncated, after train is written
    sizes = SIZES["cityscapes"]
    with pytest.raises(BadSourceFileError, match="frankfurt_000001_000019_leftImg8bit.png"):
        prepare("cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes)
    builder = data.make_builder("cityscapes", tmp_path / "tfds", expected_split_sizes=sizes)
    assert not builder.data_path.exists() and not builder.is_prepared()
    assert not list(builder.data_path.parent.glob("*incomplete*"))
    command = "python -m pne_jax prepare --dataset=cityscapes"
    with pytest.raises(data.NotPreparedError, match=command):
        data.load_builder("cityscapes", tmp_path / "tfds", expected_split_sizes=sizes)
    (manual / member).write_bytes(good)
    assert prepare(
        "cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes
    ).is_prepared()


def test_killed_preparation_is_not_complete(tmp_path):
    """SIGKILL the command line tool mid-way: what is left must not look prepared."""
    options = dict(num_train=100_000, num_validation=1, height=32, width=32, seed=5)
    cmd = [sys.executable, "-m", "data.prepare", "--dataset=synthetic", f"--data_dir={tmp_path}"]
    cmd += [f"--{k}={v}" for k, v in options.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    builder = data.make_builder("synthetic", tmp_path, **options)
    try:
        deadline = time.monotonic() + 120
        while not list(builder.data_path.parent.glob("*incomplete*")):
            assert proc.poll() is None and time.monotonic() < deadline, "preparation never started"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(builder.data_path.parent.glob("*incomplete*"))
    assert not builder.data_path.exists() and not builder.is_prepared()
    with pytest.raises(data.NotPreparedError, match="does not exist"):
        data.load_builder("synthetic", tmp_path, **options)


# --- synthetic -------------------------------------------------------------------------------

SMALL = dict(num_train=6, num_validation=3, height=48, width=64)


def _all_examples(name, data_dir, split, **options):
    src = data.data_source(name, split, data_dir, **options)
    return [src[i] for i in range(len(src))]


def test_synthetic_deterministic(tmp_path):
    prepare("synthetic", tmp_path / "a", seed=3, **SMALL)
    prepare("synthetic", tmp_path / "b", seed=3, **SMALL)
    prepare("synthetic", tmp_path / "c", seed=4, **SMALL)
    for split in ("train", "validation"):
        a = _all_examples("synthetic", tmp_path / "a", split, seed=3, **SMALL)
        b = _all_examples("synthetic", tmp_path / "b", split, seed=3, **SMALL)
        c = _all_examples("synthetic", tmp_path / "c", split, seed=4, **SMALL)
        assert len(a) == SMALL[f"num_{split}"]
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])
            assert x["name"] == y["name"] == z["name"]
            assert not np.array_equal(x["image"], z["image"])
            assert x["image"].shape == (48, 64, 3) and x["label"].shape == (48, 64)


def test_synthetic_default_preparation(tmp_path):
    start = time.perf_counter()
    builder = prepare("synthetic", tmp_path)
    seconds = time.perf_counter() - start
    print(f"synthetic default (400 + 100 at 128x256) prepared in {seconds:.1f} s")
    assert builder.builder_config.name == "seed0-train400-val100-128x256"
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": 400,
        "validation": 100,
    }
    hist = np.zeros(256, np.int64)
    for ex in data.data_source("synthetic", "train", tmp_path):
        assert ex["image"].shape == (128, 256, 3) and ex["label"].shape == (128, 256)
        hist += np.bincount(ex["label"].ravel(), minlength=256)
    classes = np.flatnonzero(hist[:255])
    assert classes.tolist() == list(range(10)) and hist[255] > 0
    assert hist[:255].min(initial=1 << 62, where=hist[:255] > 0) > 0.004 * hist.sum()

    # tf.data reads the same examples.
    ds = data.tf_dataset("synthetic", "validation", tmp_path)
    first = next(iter(ds))
    src = data.data_source("synthetic", "validation", tmp_path)
    np.testing.assert_array_equal(first["image"].numpy(), src[0]["image"])
    np.testing.assert_array_equal(first["label"].numpy(), src[0]["label"])
    assert first["name"].numpy() == src[0]["name"]


def test_tf_dataset_decodes_jpeg_as_pil(tmp_path):
    """TensorFlow's default JPEG IDCT is off by up to 4 on noisy images; ours is exact."""
    trees = fake_coco(np.random.default_rng(0), h=24, w=32)  # one greyscale JPEG in train
    cmyk = np.random.default_rng(1).integers(0, 256, (24, 32, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, format="JPEG")
    trees["train2017.zip"]["train2017/000000000030.jpg"] = buf.getvalue()  # stored as PNG
    manual = write_tree(trees, tmp_path / "manual", "zip")
    sizes = SIZES["coco_stuff164k"]
    builder = prepare("coco_stuff164k", tmp_path / "tfds", manual, expected_split_sizes=sizes)
    stored = builder.as_data_source("train", deserialize_method=NO_DECODE)
    assert [r.features.feature["image"].bytes_list.value[0][:4] for r in stored] == [
        b"\xff\xd8\xff\xe0",  # JPEG
        b"\xff\xd8\xff\xe0",  # greyscale JPEG
        b"\x89PNG",  # the CMYK JPEG, converted
    ]
    sources = source_members(trees)
    ds = data.tf_dataset("coco_stuff164k", "train", tmp_path / "tfds", expected_split_sizes=sizes)
    src = data.data_source("coco_stuff164k", "train", tmp_path / "tfds", expected_split_sizes=sizes)
    seen = 0
    for ex, np_ex in zip(ds.as_numpy_iterator(), src, strict=True):
        pil = Image.open(io.BytesIO(sources[ex["name"].decode() + ".jpg"])).convert("RGB")
        assert ex["image"].shape == (24, 32, 3)
        np.testing.assert_array_equal(ex["image"], np.asarray(pil))
        np.testing.assert_array_equal(ex["label"], np_ex["label"])
        seen += 1
    assert seen == 3


def test_unknown_dataset_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        data.make_builder("kitti", tmp_path)
    with pytest.raises(TypeError, match="num_train"):
        data.make_builder("cityscapes", tmp_path, num_train=3)
    assert data.builder_class("cityscapes_semseg") is data.builder_class("cityscapes")


def test_tensorflow_sees_no_accelerators():
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == [] and tf.config.get_visible_devices("TPU") == []
