"""Published label tables: class names, palettes and raw-id -> train-id maps.

Each table is transcribed from the source named above it. Train ids are contiguous from 0;
255 is "ignore" everywhere. A `LabelMapping` also knows which raw values may occur at all,
so a builder can reject an unknown value instead of silently mapping it. NumPy only (no
TensorFlow): `dataset_meta(name)` is what models, metrics and palettes need of a dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and an evaluator need to know about a dataset's classes."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[RGB, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.palette):
            raise ValueError(
                f"{self.name}: {len(self.class_names)} names but "
                f"{len(self.palette)} palette colours"
            )


class LabelMapping:
    """A raw-value -> train-id lookup table over uint8 label maps.

    `known` marks the raw values that may occur; anything else is an error in the source.
    """

    def __init__(self, table: Mapping[int, int], description: str):
        self.description = description
        self.lut = np.full(256, IGNORE_INDEX, np.uint8)
        self.known = np.zeros(256, bool)
        for raw, train in table.items():
            if not 0 <= raw <= 255:
                raise ValueError(f"raw value {raw} does not fit in a uint8 label map")
            self.lut[raw] = IGNORE_INDEX if train < 0 else train
            self.known[raw] = True

    def unknown_values(self, raw: np.ndarray) -> list[int]:
        """Raw values in `raw` (uint8) that the table does not define."""
        present = np.bincount(raw.ravel(), minlength=256) > 0
        return np.flatnonzero(present & ~self.known).tolist()

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return self.lut[raw]

    def as_dict(self) -> dict[int, int]:
        return {int(v): int(self.lut[v]) for v in np.flatnonzero(self.known)}


# --------------------------------------------------------------------------------------------
# Cityscapes. Source: cityscapesScripts, cityscapesscripts/helpers/labels.py (`labels`),
# https://github.com/mcordts/cityscapesScripts. Columns: name, id, trainId, colour.
# trainId 255 or -1 = not evaluated (ignored). `license plate` has id -1: it never appears
# in *_gtFine_labelIds.png (its pixels keep the vehicle's id), so the ids in files are 0..33.
# fmt: off
CITYSCAPES_LABEL_TABLE: tuple[tuple[str, int, int, RGB], ...] = (
    ("unlabeled",             0, 255, (0, 0, 0)),
    ("ego vehicle",           1, 255, (0, 0, 0)),
    ("rectification border",  2, 255, (0, 0, 0)),
    ("out of roi",            3, 255, (0, 0, 0)),
    ("static",                4, 255, (0, 0, 0)),
    ("dynamic",               5, 255, (111, 74, 0)),
    ("ground",                6, 255, (81, 0, 81)),
    ("road",                  7,   0, (128, 64, 128)),
    ("sidewalk",              8,   1, (244, 35, 232)),
    ("parking",               9, 255, (250, 170, 160)),
    ("rail track",           10, 255, (230, 150, 140)),
    ("building",             11,   2, (70, 70, 70)),
    ("wall",                 12,   3, (102, 102, 156)),
    ("fence",                13,   4, (190, 153, 153)),
    ("guard rail",           14, 255, (180, 165, 180)),
    ("bridge",               15, 255, (150, 100, 100)),
    ("tunnel",               16, 255, (150, 120, 90)),
    ("pole",                 17,   5, (153, 153, 153)),
    ("polegroup",            18, 255, (153, 153, 153)),
    ("traffic light",        19,   6, (250, 170, 30)),
    ("traffic sign",         20,   7, (220, 220, 0)),
    ("vegetation",           21,   8, (107, 142, 35)),
    ("terrain",              22,   9, (152, 251, 152)),
    ("sky",                  23,  10, (70, 130, 180)),
    ("person",               24,  11, (220, 20, 60)),
    ("rider",                25,  12, (255, 0, 0)),
    ("car",                  26,  13, (0, 0, 142)),
    ("truck",                27,  14, (0, 0, 70)),
    ("bus",                  28,  15, (0, 60, 100)),
    ("caravan",              29, 255, (0, 0, 90)),
    ("trailer",              30, 255, (0, 0, 110)),
    ("train",                31,  16, (0, 80, 100)),
    ("motorcycle",           32,  17, (0, 0, 230)),
    ("bicycle",              33,  18, (119, 11, 32)),
    ("license plate",        -1,  -1, (0, 0, 142)),
)
# fmt: on


def _cityscapes_meta() -> DatasetMeta:
    # As cityscapesScripts' trainId2label: the first label listed with a train id names it.
    by_train: dict[int, tuple[str, RGB]] = {}
    for name, _, train, colour in CITYSCAPES_LABEL_TABLE:
        if 0 <= train < IGNORE_INDEX and train not in by_train:
            by_train[train] = (name, colour)
    order = sorted(by_train)
    return DatasetMeta(
        name="cityscapes",
        class_names=tuple(by_train[t][0] for t in order),
        palette=tuple(by_train[t][1] for t in order),
    )


CITYSCAPES = _cityscapes_meta()
CITYSCAPES_ID_TO_TRAIN_ID = LabelMapping(
    {i: t for _, i, t, _ in CITYSCAPES_LABEL_TABLE if i >= 0},
    "Cityscapes label id -> train id (cityscapesScripts helpers/labels.py)",
)

# --------------------------------------------------------------------------------------------
# ADE20K (SceneParsing ADEChallengeData2016, 150 classes). Source: MMSegmentation,
# mmseg/datasets/ade.py (`ADE20KDataset.METAINFO`), https://github.com/open-mmlab/mmsegmentation
# (MMSeg's 'bed ' has a trailing space; it is dropped here). Annotations hold 0 ("other",
# not a class) and 1..150; MMSeg's reduce_zero_label maps 0 -> 255 and k -> k - 1.
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
# fmt: off
ADE20K_PALETTE: tuple[RGB, ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# fmt: on

ADE20K = DatasetMeta(name="ade20k", class_names=ADE20K_CLASS_NAMES, palette=ADE20K_PALETTE)
ADE20K_REDUCE_ZERO_LABEL = LabelMapping(
    {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, 151)}},
    "ADE20K annotation -> train id (reduce_zero_label: 0 -> 255, k -> k - 1)",
)

# --------------------------------------------------------------------------------------------
# COCO-Stuff-164k. Source: MMSegmentation, tools/dataset_converters/coco_stuff164k.py
# (`clsID_to_trID`) for the map and mmseg/datasets/coco_stuff.py (`COCOStuffDataset`) for the
# names and palette. stuffthingmaps_trainval2017 PNGs hold COCO category id - 1 (0..181,
# 80 things then 91 stuff) and 255 = unlabeled. The map keeps the raw order and skips the 11
# category ids COCO never uses; those 11, and 182..254, are not in the table (an error here).
COCO_STUFF_UNUSED_RAW_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner",
    "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# fmt: off
COCO_STUFF_PALETTE: tuple[RGB, ...] = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224),
    (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224),
    (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128),
    (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160), (0, 32, 0), (0, 128, 128),
    (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128), (0, 0, 128),
    (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192),
    (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192),
    (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192),
    (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192),
    (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128),
    (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192),
    (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192),
    (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224), (0, 32, 128), (192, 128, 192),
    (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128),
    (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128),
    (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192),
    (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192),
    (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
)
# fmt: on

COCO_STUFF164K = DatasetMeta(
    name="coco_stuff164k", class_names=COCO_STUFF_CLASS_NAMES, palette=COCO_STUFF_PALETTE
)


def _coco_stuff_table() -> dict[int, int]:
    used = [raw for raw in range(182) if raw not in COCO_STUFF_UNUSED_RAW_IDS]
    return {**{raw: train for train, raw in enumerate(used)}, IGNORE_INDEX: IGNORE_INDEX}


COCO_STUFF_RAW_TO_TRAIN_ID = LabelMapping(
    _coco_stuff_table(),
    "COCO-Stuff-164k raw id -> train id (MMSegmentation coco_stuff164k.py clsID_to_trID)",
)
# What MMSegmentation's converter writes (`*_labelTrainIds.png`): the train ids themselves.
COCO_STUFF_TRAIN_IDS = LabelMapping(
    {**{k: k for k in range(171)}, IGNORE_INDEX: IGNORE_INDEX},
    "COCO-Stuff-164k train ids 0..170 and 255 (MMSegmentation's *_labelTrainIds.png)",
)


def check_tables(metas: Sequence[DatasetMeta] = (CITYSCAPES, ADE20K, COCO_STUFF164K)) -> None:
    """Cheap self-consistency checks, run at import: a transcription slip fails loudly."""
    sizes = {"cityscapes": 19, "ade20k": 150, "coco_stuff164k": 171}
    for meta in metas:
        if meta.num_classes != sizes[meta.name]:
            raise AssertionError(f"{meta.name}: {meta.num_classes} classes, not {sizes[meta.name]}")
    for mapping, meta in (
        (CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES),
        (ADE20K_REDUCE_ZERO_LABEL, ADE20K),
        (COCO_STUFF_RAW_TO_TRAIN_ID, COCO_STUFF164K),
        (COCO_STUFF_TRAIN_IDS, COCO_STUFF164K),
    ):
        train_ids = set(mapping.as_dict().values()) - {IGNORE_INDEX}
        if train_ids != set(range(meta.num_classes)):
            raise AssertionError(f"{mapping.description}: train ids are not 0..C-1")


check_tables()

# --------------------------------------------------------------------------------------------
# The synthetic set's own classes (`pne_jax/datasets/synthetic.py` draws them).
# fmt: off
SYNTHETIC = DatasetMeta(
    name="synthetic",
    class_names=("sky", "vegetation", "road", "water", "dotted", "striped", "checkered",
                 "speckled", "car", "boat"),
    palette=((70, 130, 180), (107, 142, 35), (128, 64, 128), (0, 90, 160), (255, 140, 0),
             (220, 20, 60), (160, 60, 200), (200, 170, 110), (0, 0, 142), (0, 200, 200)),
)
# fmt: on

DATASETS: dict[str, DatasetMeta] = {
    meta.name: meta for meta in (CITYSCAPES, ADE20K, COCO_STUFF164K, SYNTHETIC)
}
"""Short dataset name -> its classes; each is registered with tfds as `<name>_semseg`."""


_SHORT_NAMES = {alias: s for s in DATASETS for alias in (s, f"{s}_semseg")}


def dataset_name(name: str) -> str:
    """The short name (`cityscapes`) of a short or registered (`cityscapes_semseg`) name;
    ValueError listing the known ones otherwise."""
    if name not in _SHORT_NAMES:
        known = ", ".join(f"{s} ({s}_semseg)" for s in DATASETS)
        raise ValueError(f"unknown dataset {name!r}; known: {known}")
    return _SHORT_NAMES[name]


def is_known_dataset(name: str) -> bool:
    """Whether `name` is one of `DATASETS`, short or registered."""
    return name in _SHORT_NAMES


def dataset_meta(name: str) -> DatasetMeta:
    """Class names, palette, number of classes and ignore index of a dataset (short or
    registered name)."""
    return DATASETS[dataset_name(name)]


def class_names_for(name: str, num_classes: int) -> list[str] | None:
    """The class names of dataset `name` for a model of `num_classes` classes: None when
    pne-jax does not know the dataset or it has another number of classes."""
    if not is_known_dataset(name):
        return None
    names = list(dataset_meta(name).class_names)
    return names if len(names) == num_classes else None
