"""Inference throughput of `Segmenter.segment` end to end, against the jitted model alone.

A stream of `--images` uint8 images alternating 1024x2048 and 512x1024 (smooth colour
blocks), with Cityscapes' test settings: test size 2048x1024 (so both sizes are predicted at
1024x2048), whole mode, and slide mode on the config's 512x1024 windows every 341x682.
Timed alternately (one stream of each in turn after a warm-up, medians), per mode:

- segment: `segmenter.segment(stream)`, all of it: host_batch, device_put of the uint8
  batches, the on-device preprocessing and model, reading back and cropping;
- program: the same jitted programs (`segmenter.function`) on uint8 batches already on the
  device, outputs left there: the device's share of segment;
- model: `evaluate.predict_batch` jitted on float32 evaluation batches (normalised, padded
  to the same canvas, same batches and fillers as segment), built and placed beforehand.

segment / model is the issue's figure (target: at least 0.9, i.e. preprocessing and padding
are not the bottleneck). Compilations are segment's for the stream, next to the number of
distinct (bucket, canvas) pairs; the host's work per stream is printed below the table.
On CPU the default is the demo model and every size scaled by 1/4 (images 256x512 /
128x256, test size 512x256, windows 128x256 every 85x170); `--full` is the paper's
DeepLabV3-R101-D8 (cityscapes_deeplab) at the real sizes, for a GPU/TPU (it overrides
`--config` and `--scale`). Weights are random: speed does not depend on them.

    python -m benchmarks.bench_inference                  # CPU: demo model, sizes x 1/4
    python -m benchmarks.bench_inference --full           # GPU: DeepLabV3-R101, 1024x2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from pne_jax import configs, evaluate, preprocess
from pne_jax.configs import common
from pne_jax.models import build_model
from pne_jax.models.numpy_init import random_variables
from pne_jax.segmenter import Segmenter, host_batch

SIZES = ((1024, 2048), (512, 1024))  # (h, w): Cityscapes frames, and half-size ones


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return tuple(max(1, round(n * scale)) for n in size)


def bench_config(spec: str, scale: float, batch_size: int) -> ml_collections.ConfigDict:
    """`spec`'s model with Cityscapes' data and test settings, every size times `scale`."""
    cityscapes = common.cityscapes()  # test size 2048x1024, slide windows its crop, 512x1024
    sizes = ("base_size", "crop_size", "test_size")
    data = common.data("cityscapes", **{k: _scaled(cityscapes[k], scale) for k in sizes})
    model = configs.get_config(spec).model
    config = ml_collections.ConfigDict({"model": model, "data": data})
    config.eval = common.evaluation(data, batch_size)
    return config


def image_stream(n: int, scale: float, seed: int = 0) -> list[np.ndarray]:
    """n uint8 [h, w, 3] images alternating SIZES * scale: 16-pixel colour blocks plus noise
    (photo-like statistics matter little here; pure noise would be atypical input)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = _scaled(SIZES[i % 2], scale)
        blocks = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3))
        image = blocks.repeat(16, 0).repeat(16, 1)[:h, :w] + rng.normal(0, 4, (h, w, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def _twice(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds of this second call (the first pays one-off costs)."""
    fn(*args)
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _put(arrays: Any, sharding: NamedSharding) -> Any:
    return jax.block_until_ready(jax.device_put(arrays, sharding))


def _read_back(outputs: jax.Array, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """What segment does with a batch's outputs: to the host, each image's map cropped."""
    read = np.asarray(outputs)
    return [np.ascontiguousarray(read[row, :h, :w]) for row, (h, w) in enumerate(shapes)]


def device_runs(segmenter: Segmenter, stream: list[np.ndarray], options: evaluate.EvalOptions):
    """(program, model, host_s): zero-argument runs of the stream's batches on the device,
    through segment's programs on uint8 batches and through predict_batch on float32
    evaluation batches (both placed beforehand, outputs blocked on), and the host's work
    (host_batch, device_put, read back + crop) per stream in seconds, stage by stage."""
    program, model, host = [], [], np.zeros(3)
    for size, bucket, canvas, chosen in segmenter.batches([i.shape[:2] for i in stream]):
        sharding, variables = segmenter._placement(size)
        uint8, host_batch_s = _twice(host_batch, [stream[i] for i in chosen], size, bucket)
        placed, put_s = _twice(_put, uint8, sharding)
        fn = jax.jit(segmenter.function("labels", options, bucket, canvas), out_shardings=sharding)
        outputs = jax.block_until_ready(fn(variables, *placed))
        _, read_s = _twice(_read_back, outputs, [stream[i].shape[:2] for i in chosen])
        host += (host_batch_s, put_s, read_s)
        program.append((fn, variables, placed))
        batch = jax.jit(preprocess.eval_batch, static_argnums=(2, 3))(
            *placed, segmenter.test_size, canvas
        )  # the evaluation format, float32 [size, *canvas, 3], made once and kept on device
        predict = jax.jit(
            lambda v, b, bucket=bucket: evaluate.predict_batch(
                segmenter.model, v, b, bucket, options
            ),
            out_shardings=sharding,
        )
        model.append((predict, variables, (batch,)))

    def runner(calls: list) -> Callable[[], None]:
        return lambda: jax.block_until_ready([fn(v, *args) for fn, v, args in calls])

    return runner(program), runner(model), host


def bench_mode(config: ml_collections.ConfigDict, variables: Any, stream: list[np.ndarray],
               mode: str, batch_size: int, repeats: int) -> tuple[str, str]:  # fmt: skip
    """(table row, note on the host's work) for one test mode."""
    segmenter = Segmenter(config, variables, batch_size=batch_size)
    start = time.perf_counter()
    segmenter.segment(stream, mode=mode)  # warm-up: compiles each bucket's program
    first_s = time.perf_counter() - start
    compiled = segmenter.compilations
    buckets = len({segmenter.program_of(image.shape[:2]) for image in stream})
    program, model, host = device_runs(segmenter, stream, segmenter.options(mode=mode))
    runs = {"segment": lambda: segmenter.segment(stream, mode=mode)}
    runs.update(program=program, model=model)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):  # alternate, so load changes hit each alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {name: len(stream) / statistics.median(t) for name, t in times.items()}
    assert segmenter.compilations == compiled, "segment compiled again after its warm-up"
    row = (
        f"| {mode:<5} | {len(stream):>6} | {rate['segment']:.2f} | {rate['program']:.2f} | "
        f"{rate['model']:.2f} | {rate['segment'] / rate['model']:.3f} | "
        f"{compiled} ({buckets}) | {first_s:.1f} |"
    )
    note = (
        f"{mode}: host work {1e3 * host.sum():.1f} ms of segment's "
        f"{1e3 * statistics.median(times['segment']):.0f} ms per stream: host_batch "
        f"{1e3 * host[0]:.1f} ms, device_put {1e3 * host[1]:.1f} ms, read back + crop "
        f"{1e3 * host[2]:.1f} ms"
    )
    return row, note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo", help="the model's config, name[:arg]")
    parser.add_argument("--full", action="store_true", help="cityscapes_deeplab, real sizes")
    parser.add_argument("--scale", type=float, default=0.25, help="sizes x this (not --full)")
    parser.add_argument("--images", type=int, default=16, help="images in the stream")
    parser.add_argument("--batch_size", type=int, default=4, help="Segmenter(batch_size=)")
    parser.add_argument("--repeats", type=int, default=5, help="timed streams of each")
    parser.add_argument("--modes", default="whole,slide", help="comma-separated")
    args = parser.parse_args(argv)
    spec, scale = ("cityscapes_deeplab", 1.0) if args.full else (args.config, args.scale)

    print(f"jax {jax.__version__} on {len(jax.devices())} x {jax.devices()[0].device_kind}; "
          f"model {spec}, sizes x {scale:g}, batch {args.batch_size}, "
          f"{args.repeats} repeats")  # fmt: skip
    config = bench_config(spec, scale, args.batch_size)
    stream = image_stream(args.images, scale)
    variables = random_variables(
        build_model(config.model), jnp.zeros((1, *_scaled(SIZES[0], scale), 3))
    )
    print(f"| {'mode':<5} | images | segment img/s | program img/s | model on padded batches "
          f"img/s | segment/model | compilations (buckets) | first call s |")  # fmt: skip
    print("|" + "---|" * 8)
    notes = []
    for mode in args.modes.split(","):
        row, note = bench_mode(config, variables, stream, mode, args.batch_size, args.repeats)
        print(row, flush=True)
        notes.append(note)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
