"""What every segmentation builder here shares: features, source checks, split sizes, writing.

Examples are `{"image": uint8 [H, W, 3], "label": uint8 [H, W] train ids (255 = ignore),
"name": source file stem}`, stored as ArrayRecord so that `tfds.data_source` (and grain) can
index them. Source images are stored as their original bytes where possible (8-bit RGB or
greyscale PNG stays PNG, JPEG stays JPEG: no second lossy encoding); any other image (16 bit,
palette, alpha, CMYK, ...) is converted by `images.to_rgb`'s rule, the one prediction uses,
and stored as 8-bit RGB PNG, so every stored image decodes alike in PIL and TensorFlow.
Labels are read by `images.to_label` (8 or 16 bit, values 0..255), mapped and stored as PNG.

That is the default storage form, `encoded`. The `raw` form (`storage="raw"`) stores the
decoded pixels instead, image and label (`raw_pixels`), several times faster to read; each
form has its own folder (`<name>_raw` beside `<name>`), so the two never mix, and the form is
recorded in the prepared data's metadata.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tensorflow_datasets.core import writer as tfds_writer

from pne_jax.datasets import DEFAULT_STORAGE, STORAGE_FORMS
from pne_jax.datasets.images import UnsupportedImageError, to_label, to_rgb
from pne_jax.datasets.labels import IGNORE_INDEX, DatasetMeta, LabelMapping
from pne_jax.datasets.manual import (
    Archive,
    ArchiveTree,
    BadSourceFileError,
    SourceFile,
    open_archives,
)
from pne_jax.datasets.raw_pixels import RawPixels

Example = dict[str, Any]

# Passed as `expected_split_sizes` to say "use the builder's published split sizes".
OFFICIAL = "official"


RAW_RECORD_OPTIONS = "group_size:1,zstd:1"
"""ArrayRecord's options for the `raw` form: one record per chunk (random access), as tfds
writes them, but zstd at level 1, not tfds's 3: on Cityscapes-like pixels 9% smaller and
about 40% faster to read (`benchmarks/bench_input.py`)."""


class StorageFormError(ValueError):
    """A storage form that does not exist, or data prepared in another form than asked for."""


def check_storage(storage: str) -> str:
    """`storage` if it is one of `STORAGE_FORMS`, else a StorageFormError naming them."""
    if storage not in STORAGE_FORMS:
        raise StorageFormError(
            f"unknown storage form {storage!r}; use one of {', '.join(STORAGE_FORMS)}"
        )
    return storage


class SplitSizeError(ValueError):
    """A split has a different number of examples than published."""


class LabelMap(tfds.features.Image):
    """A uint8 [H, W] label map stored as a 1-channel PNG; decodes to [H, W] (no channel)."""

    def __init__(self, *, doc: Any = None, **unused: Any):
        # `**unused` accepts the keys tfds passes back when it restores features.json.
        super().__init__(shape=(None, None, 1), dtype=np.uint8, encoding_format="png", doc=doc)

    def get_tensor_info(self) -> tfds.features.TensorInfo:
        return tfds.features.TensorInfo(shape=(None, None), dtype=np.uint8)

    def encode_example(self, label: np.ndarray | bytes) -> bytes:
        if isinstance(label, bytes):
            return label
        return encode_png(label)

    def decode_example(self, example):
        return super().decode_example(example)[..., 0]

    def decode_example_np(self, example: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(example)) as img:
            return np.asarray(img, dtype=np.uint8)


def semseg_features(
    image_format: str, storage: str = DEFAULT_STORAGE
) -> tfds.features.FeaturesDict:
    """The features of a segmentation example in `storage` form (`STORAGE_FORMS`)."""
    label_doc = "train ids, 255 = ignore"
    if check_storage(storage) == "raw":
        image, label = RawPixels(channels=3), RawPixels(channels=None, doc=label_doc)
    else:
        image = tfds.features.Image(shape=(None, None, 3), encoding_format=image_format)
        label = LabelMap(doc=label_doc)
    return tfds.features.FeaturesDict(
        {
            "image": image,
            "label": label,
            "name": tfds.features.Text(doc="stem of the source image file"),
        }
    )


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(data: bytes) -> int | None:
    """The bit depth per sample in a PNG's header (1, 2, 4, 8 or 16); None if not a PNG."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 25:
        return None
    return data[24]


def _keep_source_bytes(img: Image.Image, data: bytes) -> bool:
    """Whether `data` may be stored as it is: a JPEG or an 8-bit PNG in RGB or greyscale,
    which PIL and TensorFlow's decoders both expand to the same uint8 RGB."""
    if img.mode not in ("RGB", "L"):
        return False
    return img.format == "JPEG" or (img.format == "PNG" and _png_bit_depth(data) == 8)


def read_image(src: SourceFile) -> tuple[bytes, tuple[int, int]]:
    """Checks that `src` is a complete, decodable image; returns bytes to store and (H, W).

    JPEG and 8-bit PNG bytes in RGB or greyscale are kept as they are (decoders expand grey
    to RGB); anything else (16 bit, palette, alpha, CMYK, ...) is converted by
    `images.to_rgb` and stored as 8-bit RGB PNG. A mode it refuses (float, 32-bit integers
    beyond 16 bits) raises `BadSourceFileError` naming the file.
    """
    data = src.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes everything: a truncated or corrupt file raises here
            size = (img.height, img.width)
            if _keep_source_bytes(img, data):
                return data, size
            rgb = to_rgb(img, where=f"image {src}")
    except UnsupportedImageError as e:
        raise BadSourceFileError(str(e)) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSourceFileError(f"corrupt or unreadable image {src}: {e}") from e
    return encode_png(rgb), size


def read_label(src: SourceFile, mapping: LabelMapping) -> np.ndarray:
    """Decodes a raw label PNG (8 or 16 bit, values 0..255, by `images.to_label`) and maps it
    to train ids; unknown raw values are an error."""
    data = src.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            raw = to_label(img, where=f"label {src}")
    except UnsupportedImageError as e:
        raise BadSourceFileError(str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSourceFileError(f"corrupt or unreadable label {src}: {e}") from e
    unknown = mapping.unknown_values(raw)
    if unknown:
        raise BadSourceFileError(
            f"unknown label value(s) {unknown} in {src}; not in the table: {mapping.description}"
        )
    return mapping(raw)


def load_pair(image: SourceFile, label: SourceFile | None, mapping: LabelMapping) -> Example:
    """One example from an image and its raw label (None: all pixels ignored)."""
    data, size = read_image(image)
    if label is None:
        train = np.full(size, IGNORE_INDEX, np.uint8)
    else:
        train = read_label(label, mapping)
        if train.shape != size:
            raise BadSourceFileError(
                f"label {label} is {train.shape[1]}x{train.shape[0]} but "
                f"image {image} is {size[1]}x{size[0]} (width x height)"
            )
    return {"image": data, "label": train, "name": image.stem}


def match_pairs(
    dataset: str,
    split: str,
    images: Mapping[str, SourceFile],
    labels: Mapping[str, SourceFile],
    *,
    label_path: Callable[[str], str],
    image_path: Callable[[str], str],
) -> list[tuple[SourceFile, SourceFile]]:
    """Pairs images and labels by key (sorted); every image needs a label and vice versa.

    label_path / image_path: key -> where its label / image should be, for the error (one
    line, naming the dataset, the split and the expected file of each of the first three).
    """
    problems = []
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label:
        problems.append(
            f"{len(no_label)} image(s) without a label: "
            + _examples(no_label, lambda k: f"{images[k]} needs {label_path(k)}")
        )
    if no_image:
        problems.append(
            f"{len(no_image)} label(s) without an image: "
            + _examples(no_image, lambda k: f"{labels[k]} needs {image_path(k)}")
        )
    if problems:
        raise BadSourceFileError(
            f"{dataset}, split {split!r}: "
            + "; ".join(problems)
            + ". The download or its extraction may be incomplete: add the missing files."
        )
    return [(images[k], labels[k]) for k in sorted(images)]


def _examples(keys: Sequence[str], describe: Callable[[str], str], shown: int = 3) -> str:
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(describe(k) for k in keys[:shown]) + more


def _sizes(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in sizes.items())


class SemSegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: a subclass lists its work items per split and loads one item.

    expected_split_sizes: "official" (default) checks the published `SPLIT_SIZES` before
        anything is written; a dict checks those sizes instead (e.g. for a test tree);
        None skips the check, with a warning.
    storage: "encoded" (default) or "raw" (`STORAGE_FORMS`); "raw" data lives in its own
        folder, `<data_dir>/<name>_raw/...`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    META: ClassVar[DatasetMeta]
    MAPPING: ClassVar[LabelMapping]
    SPLIT_SIZES: ClassVar[Mapping[str, int]] = {}
    IMAGE_FORMAT: ClassVar[str] = "png"
    ARCHIVES: ClassVar[tuple[Archive, ...]] = ()  # manual downloads; see data.manual
    HOMEPAGE: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    # Examples prepared at once by worker threads (PIL and zlib release the GIL).
    NUM_WORKERS: ClassVar[int] = min(8, os.cpu_count() or 1)

    def __init__(
        self,
        *,
        expected_split_sizes: Mapping[str, int] | str | None = OFFICIAL,
        file_format: str = "array_record",
        storage: str = DEFAULT_STORAGE,
        **kwargs: Any,
    ):
        self.storage = check_storage(storage)  # before tfds builds the folder and the features
        if expected_split_sizes == OFFICIAL:
            expected_split_sizes = dict(self.SPLIT_SIZES)
        elif isinstance(expected_split_sizes, str):
            raise ValueError(
                f"expected_split_sizes={expected_split_sizes!r}: use "
                f"{OFFICIAL!r}, a dict of split -> count or None"
            )
        self.expected_split_sizes = expected_split_sizes
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=semseg_features(self.IMAGE_FORMAT, self.storage),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
            # Written in source order, so that index i is the i-th sorted source file.
            disable_shuffling=True,
        )

    def _build_data_dir(self, given_data_dir: str | None) -> tuple[str, str]:
        """tfds's folders, with `<name>` made `<name>_<storage>` for a storage form other
        than the default, so that the default form keeps the paths it always had."""
        data_dir, dataset_dir = super()._build_data_dir(given_data_dir)
        if self.storage == DEFAULT_STORAGE:
            return data_dir, dataset_dir
        name, *rest = os.path.relpath(dataset_dir, data_dir).split(os.sep)
        return data_dir, os.path.join(data_dir, f"{name}_{self.storage}", *rest)

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        """tfds's writer, or for the `raw` form ArrayRecord with `RAW_RECORD_OPTIONS` (tfds's
        hook for custom storage; the reader takes the options from the file)."""
        if self.storage == "raw" and self.info.file_format.value == "array_record":
            return _RawRecordWriter(self.info.file_format)
        return super()._example_writer()

    def check_prepared_storage(self, prepare: str = "prepare again") -> None:
        """Raises StorageFormError unless the data prepared at `data_path` is in this
        builder's storage form (a folder moved by hand: its records would not decode).
        `prepare` ends the fix. Data prepared before the form was recorded is `encoded`."""
        stored = (self.info.metadata or {}).get("storage", DEFAULT_STORAGE)
        if stored != self.storage:
            raise StorageFormError(
                f"{self.name}: the data at {self.data_path} is stored as {stored!r}, but "
                f"{self.storage!r} was asked for; move it back to where its form belongs, "
                f"or delete it and {prepare}"
            )

    # --- what a subclass provides ------------------------------------------------------------

    def list_items(self, manual_dir: str | None) -> dict[str, Sequence[Any]]:
        """Split name -> work items (cheap: paths or indices), in the order to write them."""
        raise NotImplementedError

    def load_item(self, item: Any) -> Example:
        """Reads and checks one work item; raises `BadSourceFileError` naming the file.

        The default takes an (image, label or None) pair and maps the label with `MAPPING`.
        """
        image, label = item
        return load_pair(image, label, self.MAPPING)

    # --- shared machinery --------------------------------------------------------------------

    def open_manual(self, manual_dir: str | os.PathLike) -> list[ArchiveTree]:
        """Opens each of `ARCHIVES` in `manual_dir`; raises `MissingManualFilesError`."""
        return open_archives(
            manual_dir,
            self.ARCHIVES,
            dataset=self.name,
            instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
        )

    def check_split_sizes(self, found: Mapping[str, int], where: str) -> None:
        expected = self.expected_split_sizes
        if expected is None:
            logging.warning(
                "%s: split sizes not checked (expected_split_sizes=None): %s",
                self.name,
                dict(found),
            )
            return
        bad = [
            f"{s!r}: expected {expected.get(s)}, found {n}"
            for s, n in found.items()
            if expected.get(s) != n
        ]
        bad += [
            f"{s!r}: expected {n}, found no such split"
            for s, n in expected.items()
            if s not in found
        ]
        if bad:
            raise SplitSizeError(
                f"{self.name}: wrong number of examples in {where}: "
                + "; ".join(bad)
                + ". The download may be incomplete. To prepare a subset on purpose pass "
                "expected_split_sizes={...} (or None, --nocheck_split_sizes on the command line)."
            )

    def prepared_size_problem(self) -> str | None:
        """Why the prepared splits are not the expected ones (a subset, prepared without the
        check or with other sizes), or None: they are, or nothing is expected. One line."""
        expected = self.expected_split_sizes
        found = {s: i.num_examples for s, i in self.info.splits.items()}
        if expected is None or found == dict(expected):
            return None
        # Recorded at preparation (absent from data prepared before it was recorded).
        recorded = self.info.metadata or {}
        how = ""
        if "expected_split_sizes" in recorded:
            checked = recorded["expected_split_sizes"]
            how = (
                ": a subset, prepared without the split-size check (--nocheck_split_sizes)"
                if checked is None
                else f" (prepared expecting {_sizes(checked)})"
            )
        return (
            f"{self.name}: the data prepared at {self.data_path} has {_sizes(found)}, not the "
            f"expected {_sizes(expected)}{how}"
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir) if self.MANUAL_DOWNLOAD_INSTRUCTIONS else None
        items = self.list_items(manual_dir)
        self.check_split_sizes({s: len(v) for s, v in items.items()}, manual_dir or "generator")
        # Written to metadata.json, so that a later run with other expectations can say so.
        expected = self.expected_split_sizes
        self.info.metadata["expected_split_sizes"] = None if expected is None else dict(expected)
        self.info.metadata["storage"] = self.storage
        return {split: self._generate_examples(split, v) for split, v in items.items()}

    def _generate_examples(self, split: str, items: Sequence[Any]) -> Iterator[tuple[int, Example]]:
        """Loads items on worker threads, yielding them in order with a progress bar (on a
        terminal only: logs and CI output keep the one summary line)."""
        bar = tqdm.tqdm(
            total=len(items), desc=f"{self.name} {split}", unit=" ex", mininterval=1, disable=None
        )
        pending: collections.deque[concurrent.futures.Future[Example]] = collections.deque()
        ahead = 4 * self.NUM_WORKERS  # bounded, so memory stays flat on large splits
        it = iter(items)
        with bar, concurrent.futures.ThreadPoolExecutor(self.NUM_WORKERS) as pool:
            try:
                for index in range(len(items)):
                    while len(pending) < ahead and (item := next(it, _END)) is not _END:
                        pending.append(pool.submit(self._load_stored, item))
                    example = pending.popleft().result()
                    bar.update(1)
                    yield index, example
            finally:  # on an error or an abandoned generator, do not finish queued work
                for future in pending:
                    future.cancel()

    def _load_stored(self, item: Any) -> Example:
        """`load_item`, in this builder's storage form: for `raw`, the image bytes decoded as
        the `encoded` form's reader decodes them, so both forms read back the same pixels."""
        example = self.load_item(item)
        if self.storage == "raw" and isinstance(example["image"], bytes):
            example["image"] = _ENCODED_IMAGE.decode_example_np(example["image"])
        return example


class _RawRecordWriter(tfds_writer.ExampleWriter):
    """Writes a shard as ArrayRecord with `RAW_RECORD_OPTIONS`."""

    def write(self, path, examples) -> None:
        writer = ArrayRecordWriter(os.fspath(path), RAW_RECORD_OPTIONS)
        try:
            for _, serialized in examples:
                writer.write(serialized)
        finally:
            writer.close()


_END = object()
# The `encoded` form's image feature: its NumPy decoder is the one `data_source` reads with.
_ENCODED_IMAGE = tfds.features.Image(shape=(None, None, 3))
