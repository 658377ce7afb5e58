"""COCO-Stuff-164k as a tfds builder: `coco_stuff164k_semseg`.

Reads `train2017.zip`, `val2017.zip` and `stuffthingmaps_trainval2017.zip` from the manual
dir (or extracted copies: `train2017/`, `val2017/` or MMSegmentation's `images/train2017/`;
`stuffthingmaps_trainval2017/`, `annotations/` or the manual dir itself for the maps), stores
the source JPEGs unchanged and maps the 182 raw ids to 171 classes as MMSegmentation's
converter does (`pne_jax.datasets.labels`). Train on `train`, evaluate on `validation`.

After MMSegmentation's `tools/dataset_converters/coco_stuff164k.py`, `annotations/<split>/`
also holds `<id>_labelTrainIds.png` (the same 171 train ids, already mapped) beside each raw
`<id>.png`, or only those with `-o OUT_DIR`. The raw map is read where there is one: our
table then also rejects ids that COCO never uses, which the converter passes through
unchanged (as valid-looking train ids); a `_labelTrainIds` map is read where it is the only one.
Either way the labels are the same.
"""

from __future__ import annotations

from typing import Any

from pne_jax.datasets.labels import (
    COCO_STUFF164K,
    COCO_STUFF_RAW_TO_TRAIN_ID,
    COCO_STUFF_TRAIN_IDS,
)
from pne_jax.datasets.manual import Archive, ArchiveTree, SourceFile
from pne_jax.datasets.semseg import Example, SemSegBuilder, load_pair, match_pairs

# tfds split -> COCO folder name (in the image zip and in the stuffthingmaps zip).
FOLDERS = {"train": "train2017", "validation": "val2017"}

ARCHIVES = (
    Archive(
        "train2017.zip",
        "train2017",
        ("train2017", "images/train2017"),
        probe_suffix=".jpg",
    ),
    Archive("val2017.zip", "val2017", ("val2017", "images/val2017"), probe_suffix=".jpg"),
    Archive(
        "stuffthingmaps_trainval2017.zip",
        "",
        ("stuffthingmaps_trainval2017", "annotations", ""),
        probe="val2017",
        probe_suffix=".png",
    ),
)
INSTRUCTIONS = """\
Download train2017.zip (18 GB) and val2017.zip (778 MB) from https://cocodataset.org/#download
(http://images.cocodataset.org/zips/train2017.zip, .../val2017.zip) and
stuffthingmaps_trainval2017.zip (659 MB) from https://github.com/nightrome/cocostuff
("Downloads": stuffthingmaps_trainval2017.zip, hosted at calvin.inf.ed.ac.uk)."""
# MMSegmentation's converter writes `<id>` + this, holding train ids, beside the raw `<id>.png`.
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"


def label_files(maps: ArchiveTree, folder: str) -> dict[str, SourceFile]:
    """Image stem -> its label map in `folder`: the raw map, or the converter's
    `*_labelTrainIds.png` where that is the only one."""
    raw: dict[str, SourceFile] = {}
    converted: dict[str, SourceFile] = {}
    for f in maps.files(folder, ".png"):
        if f.name.endswith(TRAIN_IDS_SUFFIX):
            converted[f.name[: -len(TRAIN_IDS_SUFFIX)]] = f
        else:
            raw[f.stem] = f
    return {**converted, **raw}


class CocoStuff164kSemseg(SemSegBuilder):
    """COCO-Stuff-164k, 171 classes: train 118287, validation 5000."""

    name = "coco_stuff164k_semseg"
    META = COCO_STUFF164K
    MAPPING = COCO_STUFF_RAW_TO_TRAIN_ID
    SPLIT_SIZES = {"train": 118287, "validation": 5000}
    IMAGE_FORMAT = "jpeg"
    HOMEPAGE = "https://github.com/nightrome/cocostuff"
    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    ARCHIVES = ARCHIVES

    def list_items(self, manual_dir: str | None) -> dict[str, list[Any]]:
        train_images, val_images, maps = self.open_manual(manual_dir)
        items: dict[str, list[Any]] = {}
        for (split, folder), tree in zip(FOLDERS.items(), (train_images, val_images), strict=True):
            images = {f.stem: f for f in tree.files("", ".jpg")}
            items[split] = match_pairs(
                self.name,
                split,
                images,
                label_files(maps, folder),
                label_path=lambda k, f=folder: (
                    f"{maps.where(f'{f}/{k}.png')} (or {k}{TRAIN_IDS_SUFFIX})"
                ),
                image_path=lambda k, t=tree: t.where(f"{k}.jpg"),
            )
        return items

    def load_item(self, item: tuple[SourceFile, SourceFile]) -> Example:
        image, label = item
        converted = label.name.endswith(TRAIN_IDS_SUFFIX)
        return load_pair(image, label, COCO_STUFF_TRAIN_IDS if converted else self.MAPPING)
