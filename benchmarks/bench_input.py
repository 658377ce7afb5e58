"""Training input per host core at Cityscapes size, for each storage form and augmentation path.

Prepares a fake Cityscapes-sized set with the real dataset builder, once in each storage form
(`encoded`: the images' PNG bytes and PNG labels; `raw`: `pne_jax.datasets.raw_pixels`):
photo-like 2048x1024 RGB images (smooth colour fields, texture, sensor noise; about
Cityscapes' 2 MB PNGs) with 19-class blob labels. Then it measures, side by side in one run:

- per form: disk MB per example, and CPU ms per example to read and decode it;
- per path (form x where the augmentation runs): CPU ms per training example on one core
  (what a grain worker does: read, decode, augment, or with `augment_on="device"` only
  the draws and the source region; all of the process's threads counted), the images/s one
  core delivers, and how many cores the H200 step of the paper run needs (8 images every
  68 ms: 118 images/s);
- the device part of `augment_on="device"` (`device_augment.augment_batch`): XLA's FLOP
  count and memory per image (its time belongs to the train step: `bench_train`);
- the training pipeline through grain with `--workers` processes, images/s in wall time.

CPU time is robust to other load on this shared machine; the wall-time rates are not.

    python -m benchmarks.bench_input                 # 8 examples, 2 workers
    python -m benchmarks.bench_input --examples=16 --workers=2 --batches=6
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from pne_jax import augment, device_augment, input_pipeline
from pne_jax.configs import common
from pne_jax.datasets import STORAGE_FORMS
from pne_jax.datasets.labels import CITYSCAPES
from pne_jax.datasets.semseg import SemSegBuilder, encode_png

# The paper run on one H200 (issue 17's budget): 8 images of 512x1024 per 68 ms step.
STEP_IMAGES, STEP_SECONDS = 8, 0.068


def fake_example(rng: np.random.Generator, h: int = 1024, w: int = 2048):
    """A photo-like image (smooth colour fields, texture, sensor noise) and a blob label map."""

    def field(cell):
        small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)

    image = 0.65 * field(128) + 0.3 * field(16) + rng.normal(0, 1, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    # Labels: 19 classes as nearest-seed blobs, computed at 1/8 and upsampled, 2% ignore.
    seeds, classes = rng.integers(0, [h // 8, w // 8], (40, 2)), rng.integers(0, 19, 40)
    yy, xx = np.mgrid[: h // 8, : w // 8]
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    label = augment.resize_label(classes.astype(np.uint8)[np.argmin(dist, -1)], (h, w))
    label[rng.random((h, w)) < 0.02] = 255
    return image, label


class FakeCityscapes(SemSegBuilder, skip_registration=True):
    """`num_train` fake examples of Cityscapes' size, prepared like a real dataset."""

    name = "bench_input_cityscapes"
    META = CITYSCAPES
    IMAGE_FORMAT = "png"
    NUM_TRAIN = 8
    SIZE = (1024, 2048)

    def list_items(self, manual_dir: str | None) -> dict[str, list[Any]]:
        return {"train": list(range(self.NUM_TRAIN))}

    def load_item(self, index: int) -> dict[str, Any]:
        image, label = fake_example(np.random.default_rng([0, index]), *self.SIZE)
        return {"image": encode_png(image), "label": label, "name": f"fake_{index:04d}"}


def prepare_fake(
    data_dir: str, num_examples: int, storage: str, size: tuple[int, int] = (1024, 2048)
) -> FakeCityscapes:
    """The fake set in `storage` form in `data_dir` (prepared unless it is already); images of
    `size` (h, w) other than Cityscapes' go to a folder of their own."""
    FakeCityscapes.NUM_TRAIN, FakeCityscapes.SIZE = num_examples, tuple(size)
    if tuple(size) != (1024, 2048):
        data_dir = os.path.join(data_dir, f"{size[0]}x{size[1]}")
    builder = FakeCityscapes(
        data_dir=data_dir, storage=storage, expected_split_sizes={"train": num_examples}
    )
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def _disk_mb(path) -> float:
    files = [os.fspath(p) for p in path.iterdir() if "array_record" in p.name]
    return sum(os.path.getsize(f) for f in files) / 1e6


def _cpu_ms(fns: dict, count: int, repeats: int) -> dict:
    """CPU ms per call of each fn(i), i = 0..count-1, over all threads of this process:
    the median of `repeats` rounds, each timing every fn in turn (so load changes on a
    shared machine hit all alike)."""
    times: dict = {key: [] for key in fns}
    for fn in fns.values():
        fn(0)  # warm-up
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.process_time()
            for i in range(count):
                fn(i)
            times[key].append((time.process_time() - start) / count * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}


def _config(workers: int, threads: int, batch: int, where: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"data": common.cityscapes()})
    config.data.num_workers, config.data.num_threads = workers, threads
    config.data.augment_on = where
    config.train = {"global_batch_size": batch}
    return config


PATHS = (("encoded", "host"), ("raw", "host"), ("encoded", "device"), ("raw", "device"))


def device_part(example: dict, aug: augment.TrainAugment) -> tuple[float, float]:
    """(GFLOP, MiB of temporaries) per image of the jitted `augment_batch` on one example."""
    batch = {k: v[None] for k, v in example.items()}
    compiled = jax.jit(device_augment.augment_batch, static_argnums=1).lower(batch, aug).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = compiled.memory_analysis().temp_size_in_bytes
    return cost.get("flops", float("nan")) / 1e9, temp / 2**20


def _rate(iterator, num_batches: int, batch: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next num_batches batches)."""
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return first - start, num_batches * batch / (time.perf_counter() - first)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=8, help="fake examples prepared")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the CPU timings")
    parser.add_argument("--workers", type=int, default=2, help="processes (0: this one)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--data_dir", default=None, help="reuse a folder (default: a new one)")
    args = parser.parse_args(argv)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_input_")
    sources, builders = {}, {}
    for storage in STORAGE_FORMS:
        start = time.perf_counter()
        builders[storage] = prepare_fake(data_dir, args.examples, storage)
        sources[storage] = builders[storage].as_data_source("train")
        print(f"prepared {args.examples} examples as {storage!r} in "
              f"{time.perf_counter() - start:.0f} s at {builders[storage].data_path}")  # fmt: skip

    config = _config(0, 1, args.batch, "device")
    aug, source_size = input_pipeline.train_augment(config), tuple(config.data.device_source_size)
    n = args.examples
    reads = {s: (lambda i, src=sources[s]: src[i % n]) for s in STORAGE_FORMS}
    read_ms = _cpu_ms(reads, n, args.repeats)
    fallbacks, steps = [], {}
    for storage, where in PATHS:

        def train_example(i, src=sources[storage], where=where):
            ex, rng = src[i % n], np.random.default_rng(i)
            if where == "host":
                augment.train_transform(rng, ex["image"], ex["label"], aug)
            else:
                out = device_augment.device_example(rng, ex["image"], ex["label"], aug, source_size)
                fallbacks.append(bool(out["fallback"]))

        steps[storage, where] = train_example
    train_ms = _cpu_ms(steps, n, args.repeats)
    rows = [
        (s, w, _disk_mb(builders[s].data_path) / n, read_ms[s], train_ms[s, w]) for s, w in PATHS
    ]

    need = STEP_IMAGES / STEP_SECONDS
    print(f"\nPer example, CPU time on one core; cores needed for {need:.0f} images/s "
          f"(an H200 step of {STEP_SECONDS * 1e3:.0f} ms on {STEP_IMAGES} images):")  # fmt: skip
    print("| storage | augmentation | MB / example | read + decode | training example "
          "| images/s per core | cores needed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for storage, where, mb, read_ms, train_ms in rows:
        per_core = 1e3 / train_ms
        print(f"| {storage} | {where} | {mb:.2f} | {read_ms:.1f} ms | {train_ms:.1f} ms "
              f"| {per_core:.1f} | {need / per_core:.1f} |")  # fmt: skip

    how = f"{args.workers} worker processes x {args.threads} threads"
    print(f"Device path: {sum(fallbacks)} of {len(fallbacks)} examples resized on the host.")
    ex = sources["raw"][0]
    example = device_augment.device_example(
        np.random.default_rng(0), ex["image"], ex["label"], aug, source_size
    )
    gflop, temp_mib = device_part(example, aug)
    print(f"Device part per image (XLA, {source_size[0]}x{source_size[1]} source -> "
          f"{aug.crop_size[0]}x{aug.crop_size[1]} crop): {gflop:.1f} GFLOP, {temp_mib:.0f} MiB "
          f"of temporaries; host -> device {example['source'].nbytes / 2**20:.1f} MiB of uint8 "
          f"(host path: {12 * np.prod(aug.crop_size) / 2**20:.1f} MiB of float32)")  # fmt: skip

    print(f"\nThe training pipeline ({how}, batches of {args.batch}, wall time):")
    for storage, where in PATHS:
        config = _config(args.workers, args.threads, args.batch, where)
        it = input_pipeline.train_iterator(
            config, source=sources[storage], process_index=0, process_count=1
        )
        startup, rate = _rate(it, args.batches, args.batch)
        it.close()
        print(f"  {storage}, {where} augmentation: {rate:.1f} images/s (start-up {startup:.1f} s)")
    print(f"load average {os.getloadavg()[0]:.1f} after the run")


if __name__ == "__main__":
    main()
