"""ADE20K (SceneParsing, ADEChallengeData2016) as a tfds builder: `ade20k_semseg`.

Reads `ADEChallengeData2016.zip` from the manual dir (or its extracted folder), stores the
source JPEGs unchanged and maps the annotations with reduce_zero_label (0 -> 255,
k -> k - 1) to 150 classes.
"""

from __future__ import annotations

from typing import Any

from pne_jax.datasets.labels import ADE20K, ADE20K_REDUCE_ZERO_LABEL
from pne_jax.datasets.manual import Archive
from pne_jax.datasets.semseg import SemSegBuilder, match_pairs

# tfds split -> folder under images/ and annotations/.
FOLDERS = {"train": "training", "validation": "validation"}

ARCHIVES = (
    Archive(
        "ADEChallengeData2016.zip",
        "ADEChallengeData2016",
        ("ADEChallengeData2016",),
        probe="annotations/validation",
        probe_suffix=".png",
    ),
)
INSTRUCTIONS = """\
Download ADEChallengeData2016.zip (923 MB) from
http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
(SceneParsing benchmark, http://sceneparsing.csail.mit.edu)."""


class Ade20kSemseg(SemSegBuilder):
    """ADE20K SceneParsing, 150 classes: train 20210, validation 2000."""

    name = "ade20k_semseg"
    META = ADE20K
    MAPPING = ADE20K_REDUCE_ZERO_LABEL
    SPLIT_SIZES = {"train": 20210, "validation": 2000}
    IMAGE_FORMAT = "jpeg"
    HOMEPAGE = "http://sceneparsing.csail.mit.edu"
    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    ARCHIVES = ARCHIVES

    def list_items(self, manual_dir: str | None) -> dict[str, list[Any]]:
        (tree,) = self.open_manual(manual_dir)
        items: dict[str, list[Any]] = {}
        for split, folder in FOLDERS.items():
            images = {f.stem: f for f in tree.files(f"images/{folder}", ".jpg")}
            labels = {f.stem: f for f in tree.files(f"annotations/{folder}", ".png")}
            items[split] = match_pairs(
                self.name,
                split,
                images,
                labels,
                label_path=lambda k, f=folder: tree.where(f"annotations/{f}/{k}.png"),
                image_path=lambda k, f=folder: tree.where(f"images/{f}/{k}.jpg"),
            )
        return items
