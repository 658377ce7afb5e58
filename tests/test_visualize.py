"""Palettes against the published colour tables; colorize, overlay, panel and legend."""

from __future__ import annotations

import numpy as np
import pytest

from pne_jax import visualize

# Cityscapes: cityscapesScripts, cityscapesscripts/helpers/labels.py, the `color` of the label
# carrying each trainId 0..18 (github.com/mcordts/cityscapesScripts), written out here by train
# id so that a slip in data/labels.py's transcription shows.
CITYSCAPES_TRAIN_ID_COLOURS = [
    (128, 64, 128),  # 0 road
    (244, 35, 232),  # 1 sidewalk
    (70, 70, 70),  # 2 building
    (102, 102, 156),  # 3 wall
    (190, 153, 153),  # 4 fence
    (153, 153, 153),  # 5 pole
    (250, 170, 30),  # 6 traffic light
    (220, 220, 0),  # 7 traffic sign
    (107, 142, 35),  # 8 vegetation
    (152, 251, 152),  # 9 terrain
    (70, 130, 180),  # 10 sky
    (220, 20, 60),  # 11 person
    (255, 0, 0),  # 12 rider
    (0, 0, 142),  # 13 car
    (0, 0, 70),  # 14 truck
    (0, 60, 100),  # 15 bus
    (0, 80, 100),  # 16 train
    (0, 0, 230),  # 17 motorcycle
    (119, 11, 32),  # 18 bicycle
]
# ADE20K: the SceneParsing (MIT CSAIL) colour table as MMSegmentation's ADE20KDataset.METAINFO
# ["palette"] lists it (mmseg/datasets/ade.py), index = train id (annotation value - 1).
ADE20K_ENTRIES = {
    0: (120, 120, 120),  # wall
    1: (180, 120, 120),  # building
    2: (6, 230, 230),  # sky
    3: (80, 50, 50),  # floor
    4: (4, 200, 3),  # tree
    5: (120, 120, 80),  # ceiling
    6: (140, 140, 140),  # road
    7: (204, 5, 255),  # bed
    8: (230, 230, 230),  # windowpane
    9: (4, 250, 7),  # grass
    12: (150, 5, 61),  # person
    20: (0, 102, 200),  # car
    145: (0, 133, 255),  # shower
    146: (255, 214, 0),  # radiator
    147: (25, 194, 194),  # glass
    148: (102, 255, 0),  # clock
    149: (92, 0, 255),  # flag
}
# COCO-Stuff-164k: MMSegmentation's COCOStuffDataset.METAINFO["palette"]
# (mmseg/datasets/coco_stuff.py), 171 classes in its train-id order.
COCO_STUFF_ENTRIES = {
    0: (0, 192, 64),  # person
    1: (0, 192, 64),  # bicycle (the published table repeats person's colour)
    2: (0, 64, 96),  # car
    3: (128, 192, 192),  # motorcycle
    4: (0, 64, 64),  # airplane
    5: (0, 192, 224),  # bus
    6: (0, 192, 192),  # train
    7: (128, 192, 64),  # truck
    8: (0, 192, 96),  # boat
    12: (0, 0, 64),  # parking meter
    26: (0, 0, 0),  # handbag
    168: (64, 192, 96),  # window-blind
    169: (64, 160, 64),  # window-other
    170: (64, 64, 0),  # wood
}


def _check_shape(colours, num_classes):
    assert colours.dtype == np.uint8 and colours.shape == (num_classes, 3)


def test_cityscapes_palette_is_the_official_train_id_table():
    colours = visualize.palette("cityscapes")
    _check_shape(colours, 19)
    np.testing.assert_array_equal(colours, np.array(CITYSCAPES_TRAIN_ID_COLOURS, np.uint8))
    np.testing.assert_array_equal(visualize.palette("cityscapes_semseg"), colours)


def test_ade20k_palette_entries():
    colours = visualize.palette("ade20k")
    _check_shape(colours, 150)
    for index, rgb in ADE20K_ENTRIES.items():
        assert tuple(colours[index]) == rgb, index
    # Only road and skyscraper share a colour in the published table.
    unique, counts = np.unique(colours, axis=0, return_counts=True)
    assert [tuple(c) for c in unique[counts > 1]] == [(140, 140, 140)]
    assert np.flatnonzero((colours == (140, 140, 140)).all(1)).tolist() == [6, 48]


def test_coco_stuff_palette_entries():
    colours = visualize.palette("coco_stuff164k")
    _check_shape(colours, 171)
    for index, rgb in COCO_STUFF_ENTRIES.items():
        assert tuple(colours[index]) == rgb, index
    assert len(np.unique(colours, axis=0)) < 171  # the published table has repeats


def test_synthetic_palette():
    from pne_jax.datasets.labels import SYNTHETIC

    colours = visualize.palette("synthetic")
    _check_shape(colours, 10)
    np.testing.assert_array_equal(colours, np.array(SYNTHETIC.palette, np.uint8))
    assert len(np.unique(colours, axis=0)) == 10
    assert tuple(colours[0]) == (70, 130, 180)  # sky, as Cityscapes' sky


def test_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        visualize.palette("kitti")


PALETTE = np.array([(10, 20, 30), (40, 50, 60), (70, 80, 90)], np.uint8)


def test_colorize_closed_form():
    label = np.array([[0, 1, 2], [2, 255, 0]], np.int32)
    out = visualize.colorize(label, PALETTE, ignore_color=(1, 2, 3))
    want = [[(10, 20, 30), (40, 50, 60), (70, 80, 90)], [(70, 80, 90), (1, 2, 3), (10, 20, 30)]]
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, np.array(want, np.uint8))
    # uint8 labels, default ignore colour black
    out = visualize.colorize(label.astype(np.uint8), PALETTE)
    np.testing.assert_array_equal(out[1, 1], (0, 0, 0))


@pytest.mark.parametrize("value", [3, 254, -1])
def test_colorize_rejects_labels_outside_the_palette(value):
    label = np.array([[0, value], [value, 1]])
    with pytest.raises(ValueError, match=rf"label values {value} are outside the palette's 3"):
        visualize.colorize(label, PALETTE)


def test_colorize_without_ignore_index_rejects_255():
    with pytest.raises(ValueError, match="255"):
        visualize.colorize(np.array([[255]]), PALETTE, ignore_index=None)


def test_colorize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="integer map"):
        visualize.colorize(np.zeros((2, 2), np.float32), PALETTE)
    with pytest.raises(ValueError, match=r"\[K, 3\]"):
        visualize.colorize(np.zeros((2, 2), np.int32), PALETTE[:, :2])


def test_overlay_closed_form():
    image = np.array([[[10, 0, 255], [100, 200, 0]]], np.uint8)
    colored = np.array([[[21, 255, 255], [200, 100, 1]]], np.uint8)
    np.testing.assert_array_equal(visualize.overlay(image, colored, 0.0), image)
    np.testing.assert_array_equal(visualize.overlay(image, colored, 1.0), colored)
    half = visualize.overlay(image, colored)  # (a + b) / 2, halves rounded up
    np.testing.assert_array_equal(half, [[[16, 128, 255], [150, 150, 1]]])
    quarter = visualize.overlay(image, colored, 0.25)
    np.testing.assert_array_equal(quarter, [[[13, 64, 255], [125, 175, 0]]])
    assert half.dtype == np.uint8
    with pytest.raises(ValueError, match="both be"):
        visualize.overlay(image, colored[:, :1])
    with pytest.raises(ValueError, match="alpha"):
        visualize.overlay(image, colored, 1.5)


def test_panel_and_legend_shapes():
    a = np.full((10, 20, 3), 7, np.uint8)
    b = np.full((12, 5, 3), 9, np.uint8)
    out = visualize.panel([a, b], gap=3)
    assert out.shape == (12, 28, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:10, :20], a)
    np.testing.assert_array_equal(out[:, 23:], b)
    assert (out[10:, :20] == 255).all()  # background below the shorter image
    captioned = visualize.panel([a, b], ["image", "label"])
    assert captioned.shape == (28, 29, 3)
    np.testing.assert_array_equal(captioned[16:26, :20], a)
    key = visualize.legend(["sky", "road", "car"], PALETTE, columns=2)
    assert key.shape == (32, 208, 3)
    assert (key[8, 104 + 8] == PALETTE[1]).all() and (key[8, 8] == PALETTE[0]).all()
    assert (key[24, 8] == PALETTE[2]).all()
