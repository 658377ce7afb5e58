"""Per-host, deterministic, resumable input pipelines for segmentation training and evaluation.

Sources are random-access: `len(source)` and `source[i] -> {"image": uint8 [H, W, 3], "label":
uint8 [H, W] (or [H, W, 1]), ...}`, e.g. the tfds array_record data sources that
`pne_jax.datasets` prepares (`open_source`), or a list of dicts in tests.

Training is a pure function of the step. The global example stream concatenates per-epoch
permutations drawn from (seed, epoch); global batch k is stream positions [k G, (k + 1) G) and
process p takes its contiguous G / P of them. So shards are disjoint, every epoch visits each
example once over all processes, and the global batch does not depend on the process count.
An example's augmentation draws from a generator seeded with (seed, epoch, example index).
Nothing carries over between steps: `train_iterator(config, start_step=k)` computes batch k
directly, and the step is the only state to checkpoint.

Why grain's `MapDataset`: random access is exactly that (`train_dataset(...)[k]` is batch k),
and grain adds the parallelism: `mp_prefetch` runs `num_workers` processes that each build
whole batches of their slice of steps and return them through shared memory, in step order
whatever the worker count (on 2 cores, 2 processes gave 14.6 images/s, 2 threads 9.1: PIL and
NumPy hold the GIL too often). Owning the index arithmetic, rather than grain's `shuffle` and
`random_map`, keeps the (seed, epoch, index) contract explicit and independent of grain.

Evaluation gives each process a contiguous block of ceil(N / P) examples and the same number
of fixed-size batches (SPMD steps must match); `eval_dataset` documents the batch format.
TensorFlow never sees accelerators: `open_source` hides them from it, and worker processes
start with CUDA devices hidden and JAX on the CPU.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pne_jax import augment, datasets, device_augment
from pne_jax.datasets import hide_accelerators_from_tf

Batch = dict[str, np.ndarray]
Source = Sequence[Mapping[str, Any]]

# Domain tags so that permutation and augmentation seeds never collide.
_PERMUTATION, _AUGMENT = 0, 1


def _missing(block: str, name: str, builder: str) -> ValueError:
    return ValueError(
        f"config.{block}.{name} is missing; a complete config.{block} comes from "
        f"pne_jax.configs.common.{builder}(...) (then override fields as needed)"
    )


def data_field(config: ml_collections.ConfigDict, name: str):
    """`config.data.<name>` (sequences as tuples, ConfigDicts as dicts); a missing block or
    field is a ValueError naming it. Every default lives in `pne_jax.configs.common.data`."""
    data = config.get("data")
    if data is None or name not in data:
        raise _missing("data", name, "data")
    value = data[name]
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return tuple(value) if isinstance(value, list) else value


def eval_global_batch_size(config: ml_collections.ConfigDict) -> int:
    """`config.eval.global_batch_size`, the one source of the evaluation batch size."""
    eval_config = config.get("eval")
    if eval_config is None or eval_config.get("global_batch_size") is None:
        raise _missing("eval", "global_batch_size", "evaluation")
    return int(eval_config["global_batch_size"])


def train_augment(config: ml_collections.ConfigDict) -> augment.TrainAugment:
    """The augmentation options in `config.data`."""
    names = ("base_size", "crop_size", "ratio_range", "cat_max_ratio", "flip_prob")
    names += ("photometric", "ignore_index")
    return augment.TrainAugment(**{k: data_field(config, k) for k in names})


AUGMENT_ON = ("host", "device")
"""Where the training augmentation's pixel work runs (`config.data.augment_on`)."""


def device_source_size(config: ml_collections.ConfigDict) -> augment.Size | None:
    """The static (H, W) of the source regions sent to the device when `config.data.augment_on`
    is "device" (`config.data.device_source_size`, checked against the crop size); None when
    the host augments."""
    where = data_field(config, "augment_on")
    if where not in AUGMENT_ON:
        raise ValueError(
            f"config.data.augment_on={where!r}: must be one of {', '.join(AUGMENT_ON)}"
        )
    if where == "host":
        return None
    size = data_field(config, "device_source_size")
    if size is None:
        raise ValueError(
            "config.data.augment_on='device' needs config.data.device_source_size (height, "
            "width): the size of the dataset's images, e.g. (1024, 2048) for Cityscapes"
        )
    device_augment.check_source_size(data_field(config, "crop_size"), size)
    return (int(size[0]), int(size[1]))


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; ValueError naming both unless it divides evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} must be in [0, process_count={count})")
    return index, count


# --- Sources ------------------------------------------------------------------------------------


def open_source(config: ml_collections.ConfigDict, split: str) -> Source:
    """Random access to `split` of the prepared dataset `config.data.name` in `data_dir`.

    The datasets of `pne_jax.datasets` (short names like "cityscapes", and
    `config.data.options` such as the synthetic set's sizes) are read through it; any other
    name is a tfds dataset of the user's, read with `tfds.data_source`.
    """
    name, data_dir = data_field(config, "name"), data_field(config, "data_dir")
    if not name:
        raise ValueError("config.data.name must name a dataset (or pass source=...)")
    hide_accelerators_from_tf()
    if datasets.is_known_dataset(name):
        data_dir = os.path.expanduser(data_dir or datasets.DEFAULT_DATA_DIR)
        options = {**data_field(config, "options"), "storage": data_field(config, "storage")}
        return datasets.data_source(name, split, data_dir, **options)
    import tensorflow_datasets as tfds

    return tfds.data_source(name, split=split, data_dir=data_dir)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Grain worker set-up: workers only read and augment, so they see no accelerator, and
    keep tfds's notices (logged through absl, re-logged by each worker) off the console; an
    error in a worker reaches the trainer as its exception."""
    del worker_index, worker_count
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "tensorflow" in sys.modules:
        hide_accelerators_from_tf()


def _example(source: Source, index: int) -> tuple[np.ndarray, np.ndarray]:
    example = source[index]
    image, label = np.asarray(example["image"]), np.asarray(example["label"])
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    try:
        augment.check_example(image, label)
    except ValueError as e:
        raise ValueError(f"example {index} of the source: {e}") from e
    return image, label


def iterate(
    ds: grain.MapDataset, num_workers: int, num_threads: int = 1, buffer_size: int = 2
) -> Iterator[Batch]:
    """Iterates `ds` in order with `num_workers` processes (0: this one), `num_threads` each.

    Batches are copied out of grain's shared memory, so they stay valid however long they are
    kept; closing the generator (or dropping it) stops the workers and frees the shared memory.
    """
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer_size)
    it = ds.to_iter_dataset(read)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=buffer_size
        )
        it = it.mp_prefetch(options, worker_init_fn=_worker_init)
    it = iter(it)
    try:
        for batch in it:
            batch = {k: np.array(v) for k, v in batch.items()}  # drops the shared memory
            yield batch
    finally:
        it.close()
        del it
        # grain (0.2.18) leaves each worker's last batch in a reference cycle, so its shared
        # memory would stay allocated until the next collection, or until exit, where Python's
        # resource tracker unlinks it and warns about leaked shared_memory objects.
        gc.collect()


def _iterate_config(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> Iterator[Batch]:
    get = functools.partial(data_field, config)
    return iterate(ds, get("num_workers"), get("num_threads"), get("worker_buffer_size"))


# --- Training -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order [num_examples] in which epoch `epoch` visits the examples."""
    return np.random.default_rng([seed, _PERMUTATION, epoch]).permutation(num_examples)


def train_indices(
    step: int,
    *,
    num_examples: int,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(example indices [b], epochs [b]) of this process's share of global batch `step`."""
    b = local_batch_size(global_batch_size, process_count)
    positions = step * global_batch_size + process_index * b + np.arange(b)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = [
        epoch_permutation(seed, int(e), num_examples)[o]
        for e, o in zip(epochs, offsets, strict=True)
    ]
    return np.array(indices), epochs


class _TrainElement:
    """Host stream position -> augmented example, or with `source_size` the example's draws
    and source region for `device_augment.augment_batch`; picklable for grain's workers."""

    def __init__(
        self, source, aug, seed, global_batch_size, process_index, process_count, source_size
    ):
        self.source, self.aug, self.seed, self.global_batch = source, aug, seed, global_batch_size
        self.b = local_batch_size(global_batch_size, process_count)
        self.offset = process_index * self.b
        self.source_size = source_size

    def __call__(self, position: int) -> Batch:
        step, i = divmod(int(position), self.b)  # as train_indices, for one example
        n = len(self.source)
        epoch, offset = divmod(step * self.global_batch + self.offset + i, n)
        index = int(epoch_permutation(self.seed, epoch, n)[offset])
        image, label = _example(self.source, index)
        rng = np.random.default_rng([self.seed, _AUGMENT, epoch, index])
        if self.source_size is not None:
            return device_augment.device_example(rng, image, label, self.aug, self.source_size)
        image, label = augment.train_transform(rng, image, label, self.aug)
        return {"image": image, "label": label.astype(np.int32)}


def train_dataset(
    config: ml_collections.ConfigDict,
    *,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Random-access training batches of this process: `ds[k]` is its batch at step k.

    Batches are `{"image": float32 [b, H, W, 3] (ImageNet-normalised, padding 0),
    "label": int32 [b, H, W] (255 = ignore, also in padding)}` with b = global_batch_size /
    process_count and (H, W) = crop_size. The dataset is effectively endless (2**40 examples).
    With `config.data.augment_on="device"` they are `device_augment.device_example`'s
    fields, stacked (uint8 source regions, draws, final labels), which
    `device_augment.augment_batch` turns into that batch on the device (the train step does).
    """
    index, count = _processes(process_index, process_count)
    global_batch = int(config.train.global_batch_size)
    b = local_batch_size(global_batch, count)
    aug = train_augment(config)
    source_size = device_source_size(config)
    if source is None:
        source = open_source(config, data_field(config, "train_split"))
    if len(source) == 0:
        raise ValueError("the training source is empty")
    seed = int(data_field(config, "seed"))
    element = _TrainElement(source, aug, seed, global_batch, index, count, source_size)
    return grain.MapDataset.range(2**40 // b * b).map(element).batch(b, drop_remainder=True)


def train_iterator(
    config: ml_collections.ConfigDict,
    start_step: int = 0,
    *,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Endless iterator over this process's training batches from `start_step` on.

    Yields exactly the batches an uninterrupted run yields from that step, without computing
    the earlier ones; see `train_dataset` for the format. Close it (`.close()`) to stop workers.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    ds = train_dataset(
        config, source=source, process_index=process_index, process_count=process_count
    )
    return _iterate_config(ds[start_step:], config)


# --- Evaluation ---------------------------------------------------------------------------------


def eval_block(num_examples: int, process_index: int, process_count: int) -> range:
    """The contiguous block of example indices that a process evaluates."""
    per_process = -(-num_examples // process_count)
    start = min(num_examples, process_index * per_process)
    return range(start, min(num_examples, start + per_process))


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
    """Evaluation batches per process, equal on all processes."""
    b = local_batch_size(global_batch_size, process_count)
    per_process = -(-num_examples // process_count)
    return max(1, -(-per_process // b))


def scan_eval_sizes(source: Source, test_size: augment.Size) -> tuple[augment.Size, augment.Size]:
    """Largest resized-image (h, w) and label (h, w) of the split, reading every example once."""
    image_size, label_size = (0, 0), (0, 0)
    for i in range(len(source)):
        image, label = _example(source, i)
        h, w = augment.keep_ratio_size(label.shape, test_size)
        image_size = (max(image_size[0], h), max(image_size[1], w))
        label_size = (max(label_size[0], label.shape[0]), max(label_size[1], label.shape[1]))
    return image_size, label_size


def eval_sizes_cache_path(config: ml_collections.ConfigDict) -> str | None:
    """Where the scanned pad sizes of `config`'s evaluation split are cached: a JSON file in
    the prepared data's folder, one per (dataset, options, split, test_size); None for a
    dataset `pne_jax.datasets` does not prepare (its folder is not ours to write)."""
    name = data_field(config, "name")
    if not name or not datasets.is_known_dataset(name):
        return None
    data_dir = os.path.expanduser(data_field(config, "data_dir") or datasets.DEFAULT_DATA_DIR)
    options = data_field(config, "options")
    tag = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    long, short = data_field(config, "test_size")
    split = data_field(config, "eval_split")
    return os.path.join(data_dir, "pne_jax_eval_sizes", f"{name}-{split}-{long}x{short}-{tag}.json")


def _read_sizes(path: str, num_examples: int) -> tuple[augment.Size, augment.Size] | None:
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return None
    if cached.get("num_examples") != num_examples:  # the split was prepared anew
        return None
    return tuple(cached["image"]), tuple(cached["label"])


def _write_sizes(path: str, num_examples: int, sizes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"num_examples": num_examples, "image": sizes[0], "label": sizes[1]}, f)
        os.replace(tmp, path)  # atomic: processes scanning at once never see half a file
    except OSError as e:
        logging.warning(
            "Not caching the evaluation sizes in %s (%s); the next run scans again.", path, e
        )


def eval_pad_sizes(
    config: ml_collections.ConfigDict, source: Source, cache_path: str | None = None
) -> tuple[augment.Size, augment.Size]:
    """(image pad (H, W), label pad (H, W)) of the evaluation batches.

    `config.data.eval_pad_size` / `eval_label_pad_size` where set; a size left None is the
    split's largest, found by `scan_eval_sizes` (which decodes every example) and cached in
    `cache_path` (a JSON file), so later runs read it instead of scanning.
    """
    pad_size, label_pad_size = (
        data_field(config, "eval_pad_size"),
        data_field(config, "eval_label_pad_size"),
    )
    if pad_size is not None and label_pad_size is not None:
        return tuple(pad_size), tuple(label_pad_size)
    found = _read_sizes(cache_path, len(source)) if cache_path else None
    if found is None:
        logging.warning(
            "Scanning the %d evaluation examples for their sizes (cached in %s); set "
            "config.data.eval_pad_size and eval_label_pad_size to skip this.",
            len(source),
            cache_path,
        )
        found = scan_eval_sizes(source, data_field(config, "test_size"))
        if cache_path:
            _write_sizes(cache_path, len(source), found)
    return tuple(pad_size or found[0]), tuple(label_pad_size or found[1])


class _EvalElement:
    """Position in this process's block -> padded eval example (or a masked-out filler)."""

    def __init__(self, source, block, test_size, pad_size, label_pad_size, ignore_index):
        self.source, self.block, self.test_size = source, block, test_size
        self.pad_size, self.label_pad_size = pad_size, label_pad_size
        self.ignore_index = ignore_index

    def __call__(self, position: int) -> Batch:
        if position >= len(self.block):  # a filler
            image, label, index = np.zeros((0, 0, 3), np.float32), np.zeros((0, 0), np.int32), -1
        else:
            index = self.block[position]
            image, label = _example(self.source, index)
            image, label = augment.eval_transform(image, self.test_size), label.astype(np.int32)
        try:
            padded_image = augment.pad_to(image, self.pad_size, 0.0)
            padded_label = augment.pad_to(label, self.label_pad_size, self.ignore_index)
        except ValueError as e:
            raise ValueError(
                f"eval example {index}: {e}; raise config.data.eval_pad_size {self.pad_size} or "
                f"eval_label_pad_size {self.label_pad_size}"
            ) from e
        return {
            "image": padded_image,
            "label": padded_label,
            "image_size": np.array(image.shape[:2], np.int32),
            "label_size": np.array(label.shape, np.int32),
            "mask": np.array(index >= 0),
            "index": np.array(index, np.int32),
        }


def eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's evaluation batches; every process has `num_eval_batches(...)` of them.

    The processes' blocks partition the split: each example appears exactly once, in exactly
    one process, with `mask` True. Each batch (b = eval global batch / process count) holds

    - `image` float32 [b, Hp, Wp, 3]: the image resized to fit `test_size` (ratio kept),
      normalised, at the top left; zeros elsewhere. (Hp, Wp) = `eval_pad_size`.
    - `image_size` int32 [b, 2]: (h, w) of that resized image; crop predictions to it.
    - `label` int32 [b, Lh, Lw]: the label at its original resolution, top left; 255 elsewhere.
      (Lh, Lw) = `eval_label_pad_size`.
    - `label_size` int32 [b, 2]: the label's (h, w); resize cropped predictions to it.
    - `mask` bool [b]: False for the fillers that complete the last batches (image 0, label 255,
      sizes 0); they must not enter the metric.
    - `index` int32 [b]: the example's index in the split (-1 for fillers).

    The eval batch size is `config.eval.global_batch_size`. Pad sizes come from
    `eval_pad_sizes` (the config's, or the split's largest, scanned once and cached). Build
    it once per run and pass it to `eval_iterator(config, dataset=...)` for each evaluation.
    """
    index, count = _processes(process_index, process_count)
    global_batch = eval_global_batch_size(config)
    b = local_batch_size(global_batch, count)
    cache_path = None
    if source is None:
        source = open_source(config, data_field(config, "eval_split"))
        cache_path = eval_sizes_cache_path(config)
    test_size = data_field(config, "test_size")
    pad_size, label_pad_size = eval_pad_sizes(config, source, cache_path)
    block = eval_block(len(source), index, count)
    ignore_index = data_field(config, "ignore_index")
    element = _EvalElement(source, block, test_size, pad_size, label_pad_size, ignore_index)
    num_batches = num_eval_batches(len(source), global_batch, count)
    return grain.MapDataset.range(num_batches * b).map(element).batch(b)


def eval_iterator(
    config: ml_collections.ConfigDict,
    *,
    dataset: grain.MapDataset | None = None,
    source: Source | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """One pass over this process's evaluation batches (format: `eval_dataset`).

    `dataset`: an `eval_dataset(config, ...)` built once per run, so that repeated
    evaluations neither reopen the split nor scan its sizes again; without it, one is built
    from the other arguments.
    """
    if dataset is None:
        dataset = eval_dataset(
            config, source=source, process_index=process_index, process_count=process_count
        )
    elif source is not None or process_index is not None or process_count is not None:
        raise ValueError("eval_iterator: pass either dataset= or source/process_*, not both")
    return _iterate_config(dataset, config)


# --- Device placement ---------------------------------------------------------------------------


def to_global_array(batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str = "data") -> dict:
    """Host batch -> global `jax.Array`s sharded along `axis` over `mesh` (leading dimension).

    Each process passes its own `b` rows; the global arrays have `b * process_count` rows.
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
