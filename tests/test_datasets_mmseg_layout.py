"""Data prepared the MMSegmentation way: the converters' outputs beside the downloaded files.

COCO-Stuff-164k: MMSegmentation's tools/dataset_converters/coco_stuff164k.py writes
`annotations/<split>/<id>_labelTrainIds.png` (train ids 0..170, 255 = ignore) beside each raw
`<id>.png`, or only those when given `-o OUT_DIR`. Cityscapes: cityscapesScripts (and
MMSegmentation's cityscapes.py, through it) writes `*_gtFine_labelTrainIds.png` beside
`*_gtFine_labelIds.png`, and `train.txt` / `val.txt` / `test.txt` in the dataset folder.
The fake converter outputs take their train ids from the expectations in test_datasets.py,
written there from the published tables, not from pne_jax/datasets/labels.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pne_jax import datasets as data
from pne_jax.datasets.manual import BadSourceFileError
from pne_jax.datasets.preparation import prepare
from tests.test_datasets import (
    COCO_UNUSED,
    SIZES,
    _encode,
    cityscapes_expected,
    coco_expected,
    fake_cityscapes,
    fake_coco,
    write_tree,
)

MAPS = "stuffthingmaps_trainval2017.zip"
COCO_FOLDERS = {"train": "train2017", "validation": "val2017"}


def converter_train_id(raw: int) -> int:
    """What the converter writes for a raw id: ids outside its table pass through unchanged."""
    return raw if raw in COCO_UNUSED else coco_expected(raw)


def converted_coco(trees: dict, keep_raw: bool) -> dict:
    """`trees` after the converter: each raw map gets its `<id>_labelTrainIds.png`."""
    maps = {}
    for member, content in trees[MAPS].items():
        raw = np.asarray(Image.open(io.BytesIO(content)))
        train = np.vectorize(converter_train_id, otypes=[np.uint8])(raw)
        maps[member.replace(".png", "_labelTrainIds.png")] = _encode(train, "PNG")
        if keep_raw:
            maps[member] = content
    return {**trees, MAPS: maps}


def read_labels(name: str, data_dir, sizes: dict) -> dict[str, list[tuple[bytes, np.ndarray]]]:
    return {
        split: [
            (ex["name"], ex["label"])
            for ex in data.data_source(name, split, data_dir, expected_split_sizes=sizes)
        ]
        for split in sizes
    }


@pytest.mark.parametrize("keep_raw", [True, False], ids=["beside_raw", "train_ids_only"])
def test_coco_stuff_after_mmseg_converter(keep_raw, tmp_path):
    trees = fake_coco(np.random.default_rng(0))  # every raw id in every map
    sizes = SIZES["coco_stuff164k"]
    raw_manual = write_tree(trees, tmp_path / "raw", "zip")
    prepare("coco_stuff164k", tmp_path / "tfds_raw", raw_manual, expected_split_sizes=sizes)
    mmseg = write_tree(converted_coco(trees, keep_raw), tmp_path / "mmseg", "mmseg")
    assert (mmseg / "annotations/train2017/000000000009_labelTrainIds.png").is_file()
    assert (mmseg / "annotations/train2017/000000000009.png").is_file() == keep_raw
    prepare("coco_stuff164k", tmp_path / "tfds_mmseg", mmseg, expected_split_sizes=sizes)

    want = read_labels("coco_stuff164k", tmp_path / "tfds_raw", sizes)
    got = read_labels("coco_stuff164k", tmp_path / "tfds_mmseg", sizes)
    for split, examples in want.items():
        assert [n for n, _ in got[split]] == [n for n, _ in examples]
        for (stem, label), (_, expected) in zip(got[split], examples, strict=True):
            np.testing.assert_array_equal(label, expected)
            raw = Image.open(io.BytesIO(trees[MAPS][f"{COCO_FOLDERS[split]}/{stem.decode()}.png"]))
            np.testing.assert_array_equal(label, np.vectorize(coco_expected)(np.asarray(raw)))


def test_coco_stuff_raw_map_preferred_and_checked(tmp_path):
    """Beside the raw map, the converter's map is not read: the raw one is checked against the
    table, so an id COCO never uses (which the converter passes through as a train id) is
    still an error that names the raw file."""
    trees = fake_coco(np.random.default_rng(0))
    member = "val2017/000000000139.png"
    raw = np.asarray(Image.open(io.BytesIO(trees[MAPS][member]))).copy()
    raw[0, 0] = 11
    trees[MAPS][member] = _encode(raw, "PNG")
    manual = write_tree(converted_coco(trees, keep_raw=True), tmp_path / "mmseg", "mmseg")
    with pytest.raises(
        BadSourceFileError, match=r"\[11\] in .*annotations/val2017/000000000139\.png"
    ):
        prepare(
            "coco_stuff164k",
            tmp_path / "tfds",
            manual,
            expected_split_sizes=SIZES["coco_stuff164k"],
        )


def test_cityscapes_with_label_train_ids_beside(tmp_path):
    trees = fake_cityscapes(np.random.default_rng(0))
    gtfine = trees["gtFine_trainvaltest.zip"]
    for member in [m for m in gtfine if m.endswith("_gtFine_labelIds.png")]:
        raw = np.asarray(Image.open(io.BytesIO(gtfine[member])))
        train = np.vectorize(cityscapes_expected, otypes=[np.uint8])(raw)
        gtfine[member.replace("_labelIds", "_labelTrainIds")] = _encode(train, "PNG")
    manual = write_tree(trees, tmp_path / "manual", "unzipped")
    for split in ("train", "val", "test"):  # MMSegmentation's converter writes these too
        (manual / f"{split}.txt").write_text("aachen/aachen_000000_000019\n")
    sizes = SIZES["cityscapes"]
    prepare("cityscapes", tmp_path / "tfds", manual, expected_split_sizes=sizes)
    labels = read_labels("cityscapes", tmp_path / "tfds", sizes)
    assert {split: len(v) for split, v in labels.items()} == sizes
    for split, folder in (("train", "train"), ("validation", "val")):
        for stem, label in labels[split]:
            city = stem.decode().split("_")[0]
            base = f"gtFine/{folder}/{city}/{stem.decode().removesuffix('_leftImg8bit')}"
            raw = np.asarray(Image.open(io.BytesIO(gtfine[f"{base}_gtFine_labelIds.png"])))
            np.testing.assert_array_equal(label, np.vectorize(cityscapes_expected)(raw))
