"""Prepare a dataset (write its ArrayRecord files) once; later runs do nothing.

    pne-jax prepare --dataset=cityscapes --manual_dir=~/downloads/cityscapes \\
        --data_dir=~/tensorflow_datasets
    pne-jax prepare --dataset=synthetic --data_dir=/tmp/tfds

(or `python -m pne_jax prepare ...`, or `python -m data.prepare ...` in a checkout). From
Python: `prepare(name, data_dir, manual_dir=None, **options) -> builder`.
tfds writes into a temporary `incomplete.*` folder and renames it only when every split is
written, so an interrupted run never looks prepared.
"""

from __future__ import annotations

import os
import time
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags, logging

from pne_jax.datasets import DEFAULT_DATA_DIR, DEFAULT_STORAGE, STORAGE_FORMS
from pne_jax.datasets.catalog import BUILDERS, SYNTHETIC_OPTIONS, builder_class, make_builder
from pne_jax.datasets.manual import BadSourceFileError, MissingManualFilesError
from pne_jax.datasets.semseg import SemSegBuilder, SplitSizeError, StorageFormError


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    **options: Any,
) -> SemSegBuilder:
    """Prepares `name` in `data_dir` unless already prepared; returns its builder.

    manual_dir: where the downloaded archives are (default `<data_dir>/downloads/manual`).
    options: see `catalog.make_builder` (synthetic sizes and seed; expected_split_sizes;
    storage, "encoded" or "raw": each form is prepared once, in its own folder).
    Raises `MissingManualFilesError`, `BadSourceFileError` or `SplitSizeError` (each naming
    the file, folder or counts) without leaving anything that looks prepared; also
    `SplitSizeError` when the data already prepared there has other split sizes than expected
    (a subset prepared with expected_split_sizes=None, checked by a later default run).
    """
    builder = make_builder(name, data_dir, **options)
    exists = builder.data_path.exists()
    if exists and builder.is_prepared():
        builder.check_prepared_storage()
        problem = builder.prepared_size_problem()
        if problem:
            raise SplitSizeError(
                f"{problem}. To use it as it is, pass --nocheck_split_sizes (Python: "
                f"expected_split_sizes=None); to prepare the full dataset, delete "
                f"{builder.data_path} and prepare again."
            )
        print(f"{builder.name}: already prepared at {builder.data_path}; nothing to do.")
        return builder
    if exists:
        raise FileExistsError(
            f"{builder.data_path} exists but is not a complete dataset (no "
            "dataset_info.json); delete it and prepare again."
        )
    for stale in builder.data_path.parent.glob(f"*incomplete*{builder.data_path.name}"):
        logging.warning(
            "ignoring %s, left by an interrupted preparation (delete it if no "
            "other preparation is running)",
            stale,
        )

    manual = None
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = os.path.expanduser(manual_dir or os.path.join(data_dir, "downloads", "manual"))
        # Check here too so that a missing or empty folder gets the same precise message.
        builder.open_manual(manual)

    start = time.perf_counter()
    tfds.disable_progress_bar()  # the builders show their own, with totals
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        )
    )
    splits = ", ".join(f"{s} {i.num_examples}" for s, i in builder.info.splits.items())
    print(
        f"{builder.name}: prepared {splits} in {time.perf_counter() - start:.1f} s "
        f"at {builder.data_path}"
    )
    return builder


def define_flags() -> None:
    """The CLI's flags; defined only by the command (`pne-jax prepare`), never on import."""
    known = ", ".join(BUILDERS)
    flags.DEFINE_string("dataset", None, f"one of {known} (or the registered names)")
    flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "tfds data dir to write to")
    flags.DEFINE_string(
        "manual_dir",
        None,
        "folder with the downloaded archives (default: <data_dir>/downloads/manual)",
    )
    flags.DEFINE_boolean("check_split_sizes", True, "check the published split sizes")
    flags.DEFINE_enum(
        "storage",
        DEFAULT_STORAGE,
        STORAGE_FORMS,
        "how examples are stored: encoded (PNG/JPEG bytes, least disk) or raw (decoded "
        "pixels, several times faster to read; its own folder, <name>_raw); read it with "
        "config.data.storage",
    )
    flags.DEFINE_integer("num_train", None, "synthetic: train images (default 400)")
    flags.DEFINE_integer("num_validation", None, "synthetic: validation images (default 100)")
    flags.DEFINE_integer("height", None, "synthetic: image height (default 128)")
    flags.DEFINE_integer("width", None, "synthetic: image width (default 256)")
    flags.DEFINE_integer("seed", None, "synthetic: seed (default 0)")
    flags.mark_flags_as_required(["dataset"])


def main(argv: list[str]) -> None:
    """`pne-jax prepare`: prepares `--dataset` in `--data_dir` (after `define_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        cls = builder_class(FLAGS.dataset)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    options: dict[str, Any] = {}
    for key in SYNTHETIC_OPTIONS:
        if FLAGS[key].value is not None:
            if cls.name != "synthetic_semseg":
                raise app.UsageError(f"--{key} applies to the synthetic dataset only")
            options[key] = FLAGS[key].value
    if not FLAGS.check_split_sizes:
        options["expected_split_sizes"] = None
    if FLAGS.storage != DEFAULT_STORAGE:
        options["storage"] = FLAGS.storage
    try:
        prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, **options)
    except (
        MissingManualFilesError,
        BadSourceFileError,
        SplitSizeError,
        StorageFormError,
        FileExistsError,
    ) as e:
        raise SystemExit(f"error: {e}") from None  # the message says it all; no traceback
