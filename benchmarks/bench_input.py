"""Training input throughput on Cityscapes-sized examples: decoding alone vs the full pipeline.

Writes a small fake prepared set to a temporary directory: 2048x1024 photo-like RGB PNGs
(about Cityscapes' 2 MB each) with 19-class label PNGs, one array_record file of PNG-encoded
examples, which is what tfds' array_record data sources read. Then it measures, on this machine:

- decoding alone, per image on one core, and as a rate through grain with `--workers` processes;
- the augmentation chain alone (rescale 0.5-2x, 512x1024 crop with cat_max_ratio, flip,
  photometric distortion, normalise, pad) per image on one core, on decoded arrays;
- the training pipeline (`train_iterator`: decode + augmentation + batching) in images/s.

    python -m benchmarks.bench_input --workers=2     # or --workers=0 --threads=2
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import tempfile
import time

import grain
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from pne_jax import augment, input_pipeline
from pne_jax.configs import common


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


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_fake_set(path: str, num_examples: int, seed: int = 0) -> float:
    """Writes PNG-encoded examples to one array_record file; returns the mean image PNG MB."""
    rng = np.random.default_rng(seed)
    writer = ArrayRecordWriter(path, "group_size:1")
    sizes = []
    for _ in range(num_examples):
        image_png, label_png = (_png(a) for a in fake_example(rng))
        writer.write(struct.pack("<I", len(image_png)) + image_png + label_png)
        sizes.append(len(image_png) / 1e6)
    writer.close()
    return float(np.mean(sizes))


class PngPairSource:
    """Random access to decoded examples of the file write_fake_set made (picklable)."""

    def __init__(self, path: str):
        self._records = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        (n,) = struct.unpack("<I", record[:4])
        image = np.asarray(Image.open(io.BytesIO(record[4 : 4 + n])))
        label = np.asarray(Image.open(io.BytesIO(record[4 + n :])))
        return {"image": image, "label": label}


class _Decode:
    def __init__(self, source):
        self.source = source

    def __call__(self, i):
        example = self.source[i % len(self.source)]
        return {"image": example["image"], "label": example["label"]}


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
    parser.add_argument("--examples", type=int, default=8, help="fake examples written")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per pipeline")
    parser.add_argument("--workers", type=int, default=2, help="processes (0: this one)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args(argv)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run")
    path = os.path.join(tempfile.mkdtemp(prefix="bench_input_"), "train.array_record")
    start = time.perf_counter()
    mb = write_fake_set(path, args.examples)
    print(f"wrote {args.examples} examples (image PNG {mb:.2f} MB) in "
          f"{time.perf_counter() - start:.0f} s to {path}")  # fmt: skip
    source = PngPairSource(path)

    source[0]  # warm-up
    start = time.thread_time()  # CPU time: robust to other load on the machine
    decoded = [source[i] for i in range(len(source))]
    decode_ms = (time.thread_time() - start) / len(source) * 1e3
    aug = input_pipeline.train_augment(ml_collections.ConfigDict({"data": common.cityscapes()}))
    start = time.thread_time()
    for i, ex in enumerate(decoded * 2):
        augment.train_transform(np.random.default_rng(i), ex["image"], ex["label"], aug)
    augment_ms = (time.thread_time() - start) / (2 * len(decoded)) * 1e3
    print(f"CPU time per image: decode {decode_ms:.0f} ms, augment {augment_ms:.0f} ms "
          f"(augment / decode = {augment_ms / decode_ms:.2f})")  # fmt: skip

    how = f"{args.workers} worker processes x {args.threads} threads"
    decode_ds = grain.MapDataset.range(10**9).map(_Decode(source)).batch(args.batch)
    it = input_pipeline.iterate(decode_ds, args.workers, args.threads)
    startup, rate = _rate(it, args.batches, args.batch)
    it.close()
    print(f"decode only, {how}: {rate:.1f} images/s (start-up {startup:.1f} s)")

    config = ml_collections.ConfigDict({"data": {"num_workers": args.workers}})
    config.data.num_threads = args.threads
    config.train = {"global_batch_size": args.batch}
    it = input_pipeline.train_iterator(config, source=source, process_index=0, process_count=1)
    startup, rate = _rate(it, args.batches, args.batch)
    it.close()
    print(f"train pipeline, {how}: {rate:.1f} images/s (start-up {startup:.1f} s; "
          f"batches float32 [{args.batch}, 512, 1024, 3])")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} after the run")


if __name__ == "__main__":
    main()
