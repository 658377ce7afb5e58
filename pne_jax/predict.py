"""Inference on image files: label PNGs, colorized PNGs, overlays and Cityscapes submissions.

    pne-jax predict --config=demo --workdir=runs/demo --images='photos/*.jpg' --out=predictions
    pne-jax predict --config=cityscapes_deeplab --workdir=runs/cs_deeplab \\
        --images='leftImg8bit/test/*/*_leftImg8bit.png' --out=submission --cityscapes_submission

(or `python -m pne_jax.predict ...`). The checkpoint is the workdir's latest (or
`--config.eval.checkpoint=STEP`); `--config` and its overrides work as for `pne-jax train`.
Each image goes through `pne_jax.Segmenter`, the one inference path for applications: the
evaluation's preprocessing on the device (`pne_jax.preprocess`: resized to fit
`config.data.test_size`, ratio kept, normalised) and the config's test mode
(`evaluate.predict_batch`), predicted at its original resolution.
Files are read to 8-bit RGB by the rule dataset preparation uses (`datasets.images.to_rgb`:
16-bit greyscale keeps its high byte, alpha is dropped, float images are refused).
For each input `<stem>.<ext>` the output folder gets `<stem>.png` (train ids, uint8),
`<stem>_color.png` (the dataset's palette) and `<stem>_overlay.png` (the palette on the image).

`--cityscapes_submission` writes instead one label-id PNG per image (train ids mapped back by
cityscapesScripts' table), named `<city>_<seq>_<frame>_leftImg8bit.png`, flat in the output
folder: cityscapesScripts' evalPixelLevelSemanticLabeling (and the test server) look up the
prediction of `<city>_<seq>_<frame>_gtFine_labelIds.png` as the single file matching
`<city>_<seq>_<frame>*.png` anywhere under the results folder, so the folder holds nothing else.

Images are predicted `CHUNK_BATCHES` batches at a time, batched by program (the
Segmenter's: at most one compilation per program and batch size). An image that cannot be read
is logged and skipped; the CLI lists the failures at the end and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from pne_jax import checkpoint, input_pipeline, visualize
from pne_jax.datasets.images import to_rgb
from pne_jax.datasets.labels import CITYSCAPES_LABEL_TABLE
from pne_jax.segmenter import Segmenter

CHUNK_BATCHES = 8
"""Batches read, predicted and written at a time (bounds the memory of a large folder)."""

# cityscapesScripts' getCsFileInfo: the first three "_"-separated parts name the frame.
CITYSCAPES_FRAME = re.compile(r"^([A-Za-z]+)_(\d{6})_(\d{6})(?:_|\.|$)")


@dataclasses.dataclass(frozen=True)
class Failure:
    """An input that produced no output, and why."""

    path: str
    error: str


def find_images(pattern: str) -> list[str]:
    """Sorted files matching the glob `pattern` (`**` recurses); FileNotFoundError if none."""
    paths = [
        p
        for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if os.path.isfile(p)
    ]
    if not paths:
        raise FileNotFoundError(f"--images={pattern!r} matches no file")
    return paths


def read_image(path: str) -> np.ndarray:
    """The image at `path` as uint8 RGB [H, W, 3] (decoded completely, so damage shows here),
    converted by `datasets.images.to_rgb`, the rule dataset preparation uses: 16-bit greyscale
    keeps its high byte, alpha is dropped, float images are refused (`UnsupportedImageError`).
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image, where=path)


# --- Cityscapes submission ----------------------------------------------------------------------


def cityscapes_submission_name(path: str) -> str:
    """`<city>_<seq>_<frame>_leftImg8bit.png` for a Cityscapes image file name; ValueError if
    the name does not start with `<city>_<6 digits>_<6 digits>`."""
    match = CITYSCAPES_FRAME.match(os.path.basename(path))
    if match is None:
        raise ValueError(
            f"{os.path.basename(path)!r} is not a Cityscapes file name "
            "(<city>_<6 digits>_<6 digits>_leftImg8bit.png); the evaluation matches "
            "predictions to ground truth by that prefix"
        )
    return "{}_{}_{}_leftImg8bit.png".format(*match.groups())


def cityscapes_train_to_label_id() -> np.ndarray:
    """uint8 [256] lookup: Cityscapes train id (0..18) -> label id (7, 8, 11, ..., 33), as
    cityscapesScripts' `trainId2label` (the first label listed with that train id); every
    other value maps to 0 (`unlabeled`)."""
    lut = np.zeros(256, np.uint8)
    for _, label_id, train_id, _ in reversed(CITYSCAPES_LABEL_TABLE):  # first listed wins
        if 0 <= train_id < 255 and label_id >= 0:
            lut[train_id] = label_id
    return lut


# --- Prediction ---------------------------------------------------------------------------------


def prediction_batch_size(
    config: ml_collections.ConfigDict, num_images: int, batch_size: int | None = None
) -> int:
    """`batch_size` if given, else `config.eval.global_batch_size` (the evaluation's, so
    both predict alike) capped at `num_images`; ValueError if neither is set or it is not
    positive."""
    if batch_size is None:
        try:
            configured = input_pipeline.eval_global_batch_size(config)
        except ValueError as missing:
            raise ValueError(f"{missing}; or pass --batch_size") from missing
        batch_size = min(configured, num_images)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return batch_size


def _output_names(paths: Sequence[str], cityscapes_submission: bool) -> list[str]:
    if cityscapes_submission:
        names = [cityscapes_submission_name(p) for p in paths]
    else:
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} would both be written as {name}")
        seen[name] = path
    return names


def _write_outputs(
    example: dict[str, Any],
    prediction: np.ndarray,
    out_dir: str,
    colours: np.ndarray,
    label_ids: np.ndarray | None,
) -> None:
    train_ids = prediction  # [h, w] int32, the image's size
    if label_ids is not None:
        if train_ids.max(initial=0) >= 19:
            raise ValueError(f"train id {train_ids.max()} is not a Cityscapes train id (0..18)")
        Image.fromarray(label_ids[train_ids]).save(os.path.join(out_dir, example["name"]))
        return
    stem = os.path.join(out_dir, example["name"])
    Image.fromarray(train_ids.astype(np.uint8)).save(stem + ".png")
    colored = visualize.colorize(train_ids, colours, ignore_index=None)
    Image.fromarray(colored).save(stem + "_color.png")
    Image.fromarray(visualize.overlay(example["image"], colored)).save(stem + "_overlay.png")


def predict_images(
    config: ml_collections.ConfigDict,
    variables: Any,
    paths: Sequence[str],
    out_dir: str,
    *,
    batch_size: int | None = None,
    cityscapes_submission: bool = False,
) -> list[Failure]:
    """Predicts every image in `paths` with `variables` ({"params", "batch_stats"}) and writes
    the outputs described in the module docstring to `out_dir`. Returns the inputs that failed
    (unreadable, or their outputs could not be written); the others are all written.

    `batch_size` defaults to `config.eval.global_batch_size`, capped at the number of images
    (`prediction_batch_size`; a config without it is an error, not a silent default).
    """
    paths = list(paths)
    if not paths:
        raise ValueError("no images to predict")
    batch_size = prediction_batch_size(config, len(paths), batch_size)  # before any work
    num_classes = int(config.model.num_classes)
    names = _output_names(paths, cityscapes_submission)
    colours, label_ids = None, None
    if cityscapes_submission:
        if num_classes > 19:
            raise ValueError(f"a Cityscapes submission needs <= 19 classes, not {num_classes}")
        if config.data.name not in ("cityscapes", "cityscapes_semseg"):
            logging.warning(
                "config.data.name is %r: train ids may not be Cityscapes'", config.data.name
            )
        label_ids = cityscapes_train_to_label_id()
    else:
        colours = visualize.palette(config.data.name)
        if len(colours) < num_classes:
            raise ValueError(
                f"the {config.data.name} palette has {len(colours)} colours for "
                f"{num_classes} classes"
            )
    os.makedirs(out_dir, exist_ok=True)
    segmenter = Segmenter(config, variables, batch_size=batch_size)
    logging.info("predicting %d images in batches of up to %d", len(paths), segmenter.batch_size)
    failures: list[Failure] = []

    def fail(path: str, action: str, error: Exception) -> None:
        """Any error on one input: reported, and the others still written."""
        logging.error("cannot %s %s: %s", action, path, error)
        failures.append(Failure(path, f"{type(error).__name__}: {error}"))

    chunk = CHUNK_BATCHES * segmenter.batch_size
    done = 0
    for start in range(0, len(paths), chunk):
        examples = []
        for path, name in zip(
            paths[start : start + chunk], names[start : start + chunk], strict=True
        ):
            try:
                examples.append({"path": path, "name": name, "image": read_image(path)})
            except Exception as e:
                fail(path, "read", e)
        if not examples:
            continue
        labels = segmenter.segment([e["image"] for e in examples])
        for example, label in zip(examples, labels, strict=True):
            try:
                _write_outputs(example, label, out_dir, colours, label_ids)
            except Exception as e:
                fail(example["path"], "write the prediction of", e)
        done += len(examples)
        logging.info("predicted %d / %d images", done, len(paths))
    position = {p: i for i, p in enumerate(paths)}
    return sorted(failures, key=lambda f: position[f.path])


# --- CLI ----------------------------------------------------------------------------------------


def define_flags() -> None:
    """The CLI's flags; defined only by the command (`pne-jax predict`), never on import."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "A shipped config name (e.g. demo, cityscapes_deeplab) or a file."
    )
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
    flags.DEFINE_string("images", None, "Glob of the input images ('**' recurses).")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_bool(
        "cityscapes_submission",
        False,
        "Write only Cityscapes label-id PNGs named for the evaluation and the test server.",
    )
    flags.DEFINE_integer(
        "batch_size", None, "Images per step (default: config.eval.global_batch_size)."
    )
    flags.mark_flags_as_required(["config", "workdir", "images", "out"])


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from pne_jax import console, train

    FLAGS = flags.FLAGS
    console.setup(None, FLAGS.verbosity)  # the console shows the progress, not the libraries
    config = FLAGS.config
    try:
        paths = find_images(FLAGS.images)
        prediction_batch_size(config, len(paths), FLAGS.batch_size)  # before the checkpoint
        variables, step = train.load_variables(config, FLAGS.workdir)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e  # no image; no, another or a damaged checkpoint
    print(f"predicting {len(paths)} images with step {step} of {FLAGS.workdir}", flush=True)
    failures = predict_images(
        config,
        variables,
        paths,
        FLAGS.out,
        batch_size=FLAGS.batch_size,
        cityscapes_submission=FLAGS.cityscapes_submission,
    )
    written = len(paths) - len(failures)
    print(f"wrote the predictions of {written} of {len(paths)} images to {FLAGS.out}", flush=True)
    if failures:
        lines = "\n".join(f"  {f.path}: {f.error}" for f in failures)
        raise SystemExit(f"{len(failures)} of {len(paths)} images failed:\n{lines}")


if __name__ == "__main__":
    import sys

    from pne_jax import cli

    cli.run("predict", sys.argv[1:], program="python -m pne_jax.predict")
