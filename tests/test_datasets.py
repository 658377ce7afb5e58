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
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pne_jax import datasets as data
from pne_jax.datasets import images, labels
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


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 [H, W] (greyscale) or [H, W, 3] (RGB, "48-bit"), written by hand:
    PIL writes 16-bit greyscale but not 16-bit RGB."""
    array = np.asarray(array, ">u2")
    h, w = array.shape[:2]
    colour_type = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + array[y].tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def grey16_gradient(h: int, w: int) -> np.ndarray:
    """uint16 [h, w]: 0 .. 65535 evenly, row by row (both ends included)."""
    return np.round(np.linspace(0, 65535, h * w)).astype(np.uint16).reshape(h, w)


def high_byte(values: np.ndarray) -> np.ndarray:
    """The documented 16 -> 8 bit rule, stated independently: v >> 8, as uint8."""
    return (np.asarray(values).astype(np.int64) // 256).astype(np.uint8)


def palette_with_alpha(rng, h: int, w: int) -> tuple[bytes, np.ndarray]:
    """A P PNG whose palette has per-entry alpha (tRNS as bytes), and its RGB colours."""
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (h, w), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=bytes([0, 64, 128, 255]))
    return buf.getvalue(), palette[index]


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


# --- image modes: one rule for preparation and prediction (pne_jax/datasets/images.py) --------

CITY_IMAGES = "leftImg8bit_trainvaltest.zip"
CITY_LABELS = "gtFine_trainvaltest.zip"


def _city_member(split: str, city: str, k: int, kind: str) -> str:
    stem = f"{city}_{k:06d}_000019"
    if kind == "image":
        return f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
    return f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"


def test_image_modes_prepared_by_one_rule(tmp_path):
    """16-bit greyscale, 48-bit RGB, RGBA, LA and palette-with-alpha sources are stored as
    8-bit RGB PNGs with the documented values (16 bit: v >> 8, not white or binary; alpha
    dropped), read alike by `data_source` and `tf_dataset`; a 16-bit label map keeps its
    values."""
    rng = np.random.default_rng(0)
    h, w = 8, 12
    trees = fake_cityscapes(rng, h=h, w=w)
    gradient = grey16_gradient(h, w)
    rgb16 = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    la = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
    p_bytes, p_rgb = palette_with_alpha(rng, h, w)
    sources = {  # member -> (bytes, expected uint8 RGB)
        _city_member("train", "aachen", 0, "image"): (
            _encode(gradient, "PNG"),
            np.repeat(high_byte(gradient)[..., None], 3, -1),
        ),
        _city_member("train", "aachen", 1, "image"): (_encode(rgba, "PNG"), rgba[..., :3]),
        _city_member("train", "bochum", 2, "image"): (p_bytes, p_rgb),
        _city_member("val", "frankfurt", 0, "image"): (
            _encode(la, "PNG"),
            np.repeat(la[..., :1], 3, -1),
        ),
        _city_member("val", "frankfurt", 1, "image"): (png16(rgb16), high_byte(rgb16)),
    }
    assert _encode(gradient, "PNG")[24] == 16  # a real 16-bit PNG
    for member, (content, _) in sources.items():
        trees[CITY_IMAGES][member] = content
    label_member = _city_member("train", "aachen", 0, "label")
    raw = np.asarray(Image.open(io.BytesIO(trees[CITY_LABELS][label_member])))
    trees[CITY_LABELS][label_member] = _encode(raw.astype(np.uint16), "PNG")  # 16 bit, <= 33
    manual = write_tree(trees, tmp_path / "manual", "zip")
    sizes = SIZES["cityscapes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PIL's palette-transparency warning
        builder = prepare("cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes)
    expected = {m.rsplit("/", 1)[-1][:-4]: rgb for m, (_, rgb) in sources.items()}
    seen = set()
    for split in sizes:
        src = data.data_source("cityscapes", split, tmp_path / "tfds", expected_split_sizes=sizes)
        ds = data.tf_dataset("cityscapes", split, tmp_path / "tfds", expected_split_sizes=sizes)
        stored = builder.as_data_source(split, deserialize_method=NO_DECODE)
        for i, (tf_ex, ex) in enumerate(zip(ds.as_numpy_iterator(), src, strict=True)):
            np.testing.assert_array_equal(tf_ex["image"], ex["image"])  # PIL == TensorFlow
            np.testing.assert_array_equal(tf_ex["label"], ex["label"])
            name = ex["name"].decode()
            if name not in expected:
                continue
            seen.add(name)
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3)
            np.testing.assert_array_equal(ex["image"], expected[name])
            png = stored[i].features.feature["image"].bytes_list.value[0]
            assert png[:4] == b"\x89PNG" and png[24:26] == bytes([8, 2])  # 8-bit RGB
    assert seen == set(expected)
    grey = expected["aachen_000000_000019_leftImg8bit"][..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and len(np.unique(grey)) > h * w // 2
    train = data.data_source("cityscapes", "train", tmp_path / "tfds", expected_split_sizes=sizes)
    label = next(ex["label"] for ex in train if ex["name"] == b"aachen_000000_000019_leftImg8bit")
    np.testing.assert_array_equal(label, np.vectorize(cityscapes_expected)(raw))


def test_unconvertible_images_and_labels_refused(tmp_path):
    """A float image, a 32-bit image beyond 16 bits and a 16-bit label above 255 stop the
    preparation with one line naming the file and what it holds."""
    sizes = SIZES["cityscapes"]
    member = _city_member("train", "aachen", 0, "label")
    trees = fake_cityscapes(np.random.default_rng(0))
    raw = np.asarray(Image.open(io.BytesIO(trees[CITY_LABELS][member]))).astype(np.uint16)
    raw[1, 2] = 300
    trees[CITY_LABELS][member] = _encode(raw, "PNG")
    manual = write_tree(trees, tmp_path / "labels", "zip")
    with pytest.raises(BadSourceFileError) as err:
        prepare("cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes)
    msg = str(err.value)
    assert "\n" not in msg and f"{manual}/{CITY_LABELS}:{member}" in msg
    assert "a largest value of 300" in msg and "0..255" in msg

    member = _city_member("train", "aachen", 0, "image")
    for mode, array, what in (
        ("F", np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12), "mode 'F' (32-bit float)"),
        ("I", np.full((8, 12), 70_000, np.int32), "mode 'I' with values 70000..70000"),
    ):
        trees = fake_cityscapes(np.random.default_rng(0))
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="TIFF")  # PIL reads it by its content
        trees[CITY_IMAGES][member] = buf.getvalue()
        manual = write_tree(trees, tmp_path / mode, "unzipped")
        with pytest.raises(BadSourceFileError) as err:
            prepare("cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes)
        msg = str(err.value)
        assert "\n" not in msg and str(manual / member) in msg and what in msg
        assert "convert the file to 8-bit RGB" in msg


def test_to_rgb_and_to_label_by_mode():
    """The shared rule on each mode, without files."""
    rng = np.random.default_rng(0)
    gradient = grey16_gradient(4, 64)
    want = np.repeat(high_byte(gradient)[..., None], 3, -1)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")):
        image = Image.frombytes(mode, (64, 4), gradient.astype(dtype).tobytes())
        np.testing.assert_array_equal(np.asarray(image), gradient)
        np.testing.assert_array_equal(images.to_rgb(image), want)
    np.testing.assert_array_equal(
        images.to_rgb(Image.fromarray(gradient.astype(np.int32), "I")), want
    )
    cmyk = Image.fromarray(rng.integers(0, 256, (4, 5, 4), dtype=np.uint8), "CMYK")
    np.testing.assert_array_equal(images.to_rgb(cmyk), np.asarray(cmyk.convert("RGB")))
    p_bytes, p_rgb = palette_with_alpha(rng, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(images.to_rgb(Image.open(io.BytesIO(p_bytes))), p_rgb)
    with pytest.raises(images.UnsupportedImageError, match=r"x\.tif has image mode 'F'"):
        images.to_rgb(Image.new("F", (2, 2)), where="x.tif")
    negative = Image.fromarray(np.array([[-1, 5]], np.int32), "I")
    with pytest.raises(images.UnsupportedImageError, match=r"values -1\.\.5, outside"):
        images.to_rgb(negative)

    values = np.array([[0, 7, 255]], np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32), "I")):
        label = images.to_label(image)
        assert label.dtype == np.uint8 and label.tolist() == [[0, 7, 255]]
    index = Image.fromarray(np.array([[3, 1]], np.uint8), "P")
    index.putpalette([9] * 12)
    assert images.to_label(index).tolist() == [[3, 1]]  # indices, not colours
    with pytest.raises(images.UnsupportedImageError, match="a largest value of 256"):
        images.to_label(Image.fromarray(np.array([[256]], np.uint16)))
    with pytest.raises(images.UnsupportedImageError, match="a smallest value of -2"):
        images.to_label(Image.fromarray(np.array([[-2]], np.int32), "I"))
    with pytest.raises(images.UnsupportedImageError, match="y.png has image mode 'RGB'"):
        images.to_label(Image.new("RGB", (2, 2)), where="y.png")


def test_unknown_dataset_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        data.make_builder("kitti", tmp_path)
    with pytest.raises(TypeError, match="num_train"):
        data.make_builder("cityscapes", tmp_path, num_train=3)
    assert data.builder_class("cityscapes_semseg") is data.builder_class("cityscapes")


def test_tensorflow_sees_no_accelerators():
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == [] and tf.config.get_visible_devices("TPU") == []
