"""Opt-in (`make parity`): our Cityscapes metrics equal the official cityscapesScripts tool's.

A small fake val set in the official layout (gtFine/val/<city>/*_gtFine_labelIds.png, label
ids 0-33 including the ones ignored in evaluation) and predictions as label-id PNGs, random
and realistic (mostly correct, with noise). The official evalPixelLevelSemanticLabeling
(2.3.0) evaluates the PNGs; we map both to train ids (pne_jax/datasets/labels.py) and use
metrics.confusion_matrix + segmentation_metrics. Per-class IoU, mIoU and pixel accuracy
must agree to 1e-9, and the confusion matrices exactly.

The official tool's quirks, and how we compare:
- It counts a 34 x 34 matrix over all label ids; IoU's false positives skip pixels whose
  ground truth is ignored in evaluation, as our 255 does. Its per-class IoU is NaN for the
  15 ignored ids and for a class with neither ground truth nor predictions (as ours), and 0
  for a class predicted but absent from the ground truth (as ours); its mean skips NaN.
- It reports no overall pixel accuracy. Its `evalPixelAccuracy` per-image statistics are
  mislabelled in 2.3.0: "nbNotIgnoredPixels" counts the *ignored* pixels and
  "nbCorrectPixels" the wrong predictions on them (asserted below, so a fixed release is
  noticed). We compare our aAcc with the accuracy of its confusion matrix over the 19
  evaluated ids instead.
- Predicting an ignored id (e.g. 0) counts as a false negative there; ours cannot: our
  predictions are train ids, written as the 19 evaluated ids.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pne_jax import metrics, predict
from pne_jax.datasets import labels as label_tables

pytestmark = pytest.mark.parity

NUM_CLASSES = 19
SHAPE = (64, 128)
CITIES = {"frankfurt": 3, "lindau": 2, "munster": 2}
# Train ids absent from the ground truth: 16 (train) is also never predicted -> NaN in both;
# 17 (motorcycle) is predicted -> IoU 0 in both.
ABSENT_FROM_GT = (16, 17)
NEVER_PREDICTED = (16,)


def _fake_ground_truth(rng: np.random.Generator) -> np.ndarray:
    """Blocky label-id maps (8 x 8 regions) over ids 0-33 except the absent train ids."""
    to_train = label_tables.CITYSCAPES_ID_TO_TRAIN_ID
    ids = [i for i in range(34) if to_train.lut[i] not in ABSENT_FROM_GT]
    blocks = rng.choice(ids, size=(SHAPE[0] // 8, SHAPE[1] // 8))
    gt = blocks.repeat(8, 0).repeat(8, 1).astype(np.uint8)
    edges = rng.random(SHAPE) < 0.03  # scattered ignored pixels, as at object borders
    gt[edges] = 0
    return gt


def _predictions(gt_train: np.ndarray, rng: np.random.Generator, realistic: bool) -> np.ndarray:
    allowed = np.array([t for t in range(NUM_CLASSES) if t not in NEVER_PREDICTED])
    noise = rng.choice(allowed, size=gt_train.shape)
    if not realistic:
        return noise
    keep = (gt_train != 255) & (rng.random(gt_train.shape) > 0.15)
    return np.where(keep, gt_train, noise)


@pytest.fixture(scope="module")
def official():
    return pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")


@pytest.mark.parametrize("realistic", [False, True])
def test_metrics_equal_the_official_cityscapes_evaluation(
    tmp_path, monkeypatch, official, realistic
):
    rng = np.random.default_rng(int(realistic))
    root, results = tmp_path / "cityscapes", tmp_path / "results"
    to_train, to_label_id = (
        label_tables.CITYSCAPES_ID_TO_TRAIN_ID,
        predict.cityscapes_train_to_label_id()[:NUM_CLASSES],
    )
    total = metrics.Confusion.zeros(NUM_CLASSES)
    gt_files, pred_files, ignored_pixels, wrong_on_ignored = [], [], 0, 0
    for city, count in CITIES.items():
        os.makedirs(root / "gtFine" / "val" / city)
        os.makedirs(results / city)
        for frame in range(count):
            stem = f"{city}_000000_{frame:06d}"
            gt = _fake_ground_truth(rng)
            gt_train = to_train(gt).astype(np.int32)
            pred_train = _predictions(gt_train, rng, realistic)
            pred = to_label_id[pred_train]
            gt_file = str(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
            pred_file = str(results / city / f"{stem}_pred.png")
            Image.fromarray(gt).save(gt_file)
            Image.fromarray(pred).save(pred_file)
            gt_files.append(gt_file)
            pred_files.append(pred_file)
            # Ours, from the PNGs as written (label ids -> train ids).
            ours_pred = to_train(np.asarray(Image.open(pred_file))).astype(np.int32)
            ours_gt = to_train(np.asarray(Image.open(gt_file))).astype(np.int32)
            np.testing.assert_array_equal(ours_pred, pred_train)
            counts = metrics.confusion_matrix(ours_pred, ours_gt, NUM_CLASSES)
            total = metrics.accumulate(total, counts)
            ignored_pixels += int((gt_train == 255).sum())
            wrong_on_ignored += int(((gt_train == 255) & (pred != gt)).sum())

    # The official tool, through its module-level args (no files written into the repo).
    args = official.args
    args.cityscapesPath = str(root)
    args.groundTruthSearch = str(root / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")
    args.predictionPath, args.predictionWalk = str(results), None
    args.exportFile = str(tmp_path / "result.json")
    args.evalInstLevelScore = False  # needs *_instanceIds.png
    args.evalPixelAccuracy = True
    # NumPy 2 removed np.in1d, which that branch calls; np.isin is its replacement.
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    args.JSONOutput, args.quiet, args.colorized = False, True, False
    args.bold = args.nocol = ""
    assert [official.getPrediction(args, g) for g in gt_files] == pred_files
    result = official.evaluateImgLists(pred_files, gt_files, args)

    ours = metrics.segmentation_metrics(total, list(label_tables.CITYSCAPES.class_names))
    confusion = metrics.to_counts(total)
    eval_ids = to_label_id  # the official matrix's rows/columns of our 19 classes
    official_matrix = np.asarray(result["confMatrix"], np.float64)
    np.testing.assert_array_equal(official_matrix[np.ix_(eval_ids, eval_ids)], confusion)

    for t, name in enumerate(label_tables.CITYSCAPES.class_names):
        want = result["classScores"][name]
        got = ours[f"iou/{name}"]
        if t == NEVER_PREDICTED[0]:
            assert np.isnan(want) and np.isnan(got), name
        else:
            assert abs(got - want) <= 1e-9, (name, got, want)
    assert result["classScores"]["motorcycle"] == ours["iou/motorcycle"] == 0.0
    assert abs(ours["miou"] - result["averageScoreClasses"]) <= 1e-9
    # The 15 ids ignored in evaluation: NaN, left out of the official mean.
    ignored_names = [
        n for n, i, t, _ in label_tables.CITYSCAPES_LABEL_TABLE if i >= 0 and not 0 <= t < 19
    ]
    assert len(ignored_names) == 15 and all(
        np.isnan(result["classScores"][n]) for n in ignored_names
    )

    # Pixel accuracy: the official confusion matrix over the 19 evaluated ids.
    block = official_matrix[np.ix_(eval_ids, eval_ids)]
    official_rows = official_matrix[eval_ids].sum()
    assert abs(ours["aacc"] - np.trace(block) / official_rows) <= 1e-9
    # The mislabelled per-image statistics (see the module docstring).
    stats = result["perImageScores"]
    assert sum(s["nbNotIgnoredPixels"] for s in stats.values()) == ignored_pixels
    assert sum(s["nbCorrectPixels"] for s in stats.values()) == wrong_on_ignored
