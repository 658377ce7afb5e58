"""Cityscapes (gtFine) semantic segmentation as a tfds builder: `cityscapes_semseg`.

Reads `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from the manual dir (or
their extracted `leftImg8bit/` and `gtFine/` folders), maps `*_gtFine_labelIds.png` to the 19
train ids with the official table (`pne_jax.datasets.labels`), and stores the source PNGs unchanged.
Files that cityscapesScripts adds beside them (`*_gtFine_labelTrainIds.png`, ...) are not read.
The test split has no public labels: its labels are all 255.
"""

from __future__ import annotations

from typing import Any

from pne_jax.datasets.labels import CITYSCAPES, CITYSCAPES_ID_TO_TRAIN_ID
from pne_jax.datasets.manual import Archive
from pne_jax.datasets.semseg import SemSegBuilder, match_pairs

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
# tfds split -> folder in the archives.
FOLDERS = {"train": "train", "validation": "val", "test": "test"}

ARCHIVES = (
    Archive("leftImg8bit_trainvaltest.zip", "leftImg8bit", ("leftImg8bit",), probe="val"),
    Archive("gtFine_trainvaltest.zip", "gtFine", ("gtFine",), probe="val"),
)
INSTRUCTIONS = """\
Download leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB) from
https://www.cityscapes-dataset.com/downloads/ (free registration required)."""


class CityscapesSemseg(SemSegBuilder):
    """Cityscapes fine annotations, 19 classes: train 2975, validation 500, test 1525."""

    name = "cityscapes_semseg"
    META = CITYSCAPES
    MAPPING = CITYSCAPES_ID_TO_TRAIN_ID
    SPLIT_SIZES = {"train": 2975, "validation": 500, "test": 1525}
    IMAGE_FORMAT = "png"
    HOMEPAGE = "https://www.cityscapes-dataset.com"
    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    ARCHIVES = ARCHIVES

    def list_items(self, manual_dir: str | None) -> dict[str, list[Any]]:
        images_tree, labels_tree = self.open_manual(manual_dir)
        items: dict[str, list[Any]] = {}
        for split, folder in FOLDERS.items():
            images = {
                f.path[: -len(IMAGE_SUFFIX)]: f for f in images_tree.files(folder, IMAGE_SUFFIX)
            }
            if split == "test":
                items[split] = [(images[k], None) for k in sorted(images)]
                continue
            labels = {
                f.path[: -len(LABEL_SUFFIX)]: f for f in labels_tree.files(folder, LABEL_SUFFIX)
            }
            items[split] = match_pairs(
                self.name,
                split,
                images,
                labels,
                label_path=lambda k: labels_tree.where(k + LABEL_SUFFIX),
                image_path=lambda k: images_tree.where(k + IMAGE_SUFFIX),
            )
        return items
