"""Train-step speed of the paper's configs, and the share of the step spent in PNE.

For each config it compiles the trainer's jitted step (`train.make_train_step`, state
donated) twice, with PNE on and off, and times them alternately on the same random batch
(one step of each in turn after a warm-up, so load changes on a shared machine hit both
alike; medians; compile time apart), in float32 and bfloat16. It prints both step times,
their ratio, images/s and the PNE share of the step (target: under 3%) two ways: the median
of the paired differences (t_on - t_off) over t_on, and the PNE loss alone (forward +
backward on realistic labels at the step's feature shapes) over t_on. By default on CPU it
uses a reduced crop and batch; `--full` uses each config's own crop and batch (GPU/TPU):
DeepLabV3-R101-D8 at 8x512x1024 (S=100, D=256, C=19) and UperNet-Swin-T at 16x512x512
(C=150).

    python -m benchmarks.bench_train                      # CPU, reduced sizes (2x128x256)
    python -m benchmarks.bench_train --configs=cityscapes_deeplab,ade20k_upernet_swin:tiny \
        --dtypes=float32 --repeats=5                      # the README's CPU rows
    python -m benchmarks.bench_train --full --configs=cityscapes_deeplab,ade20k_upernet_swin:tiny

`--augment_on=device` times the step with the augmentation's pixel work in it
(`config.data.augment_on="device"`: the batch is fake examples' draws and source regions,
`device_augment.augment_batch` runs first), so the on/off columns include it.

`--input_paths` instead times the trainer's loop on the real input pipeline, for each input
path (storage form `encoded` or `raw` x augmentation on the host or the device), on a fake
Cityscapes-like set (`benchmarks.bench_input`) with `--workers` grain processes: ms per
step, images/s, and the share of the step spent blocked waiting for the next batch
(`next()` plus the transfer), against the same step on a batch already on the device. With
`--full` on a GPU this is the paper run's input budget; the README's "paper run" row is
40k x the step with the best path.

    python -m benchmarks.bench_train --full --configs=cityscapes_deeplab --dtypes=bfloat16 \
        --input_paths --workers=8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.bench_input import PATHS, fake_example, prepare_fake
from benchmarks.bench_loss import median_time, realistic_batch
from pne_jax import configs, device_augment, input_pipeline, optim, train
from pne_jax.losses import pne_loss
from pne_jax.models import build_model

DEFAULT_CONFIGS = "demo,cityscapes_deeplab,ade20k_upernet_swin:tiny"


def load_config(spec: str):
    return configs.get_config(spec)


def random_batch(rng, batch, crop, num_classes):
    """Images and blob labels with some misclassification, so PNE has pairs to work on."""
    h, w = crop
    coarse = rng.integers(0, num_classes, size=(batch, h // 32 + 1, w // 32 + 1))
    labels = coarse.repeat(32, 1).repeat(32, 2)[:, :h, :w]
    labels[rng.random(labels.shape) < 0.05] = 255
    images = rng.normal(size=(batch, h, w, 3)).astype(np.float32)
    return {"image": images, "label": labels.astype(np.int32)}


def device_batch(config, batch_size: int, num_classes: int) -> dict[str, np.ndarray]:
    """What the pipeline sends with `augment_on="device"`: `batch_size` fake examples of
    `config.data.device_source_size` (labels folded into the classes), drawn and sliced."""
    aug = input_pipeline.train_augment(config)
    size = input_pipeline.device_source_size(config)
    examples = []
    for i in range(batch_size):
        image, label = fake_example(np.random.default_rng(i), *size)
        label = np.where(label == 255, 255, label % num_classes).astype(np.uint8)
        rng = np.random.default_rng([1, i])
        examples.append(device_augment.device_example(rng, image, label, aug, size))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def set_augment_on(config, where: str, full: bool) -> None:
    """`config.data.augment_on = where`; at reduced sizes (not `full`) the device's source
    images are twice the crop, and the base size theirs."""
    config.data.augment_on = where
    if where == "device" and not full:
        h, w = (2 * s for s in config.data.crop_size)
        config.data.device_source_size, config.data.base_size = (h, w), (max(h, w), min(h, w))


def build_step(config, batch):
    """(compiled step, initial state, device batch, compile seconds, model, abstract variables)
    for `config`: the trainer's own jitted step (`train.make_train_step`, state donated)."""
    mesh = train.make_mesh()
    model = build_model(config.model)
    crop = tuple(config.data.crop_size)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *crop, 3))))
    tx, schedule = optim.build_optimizer(config, abstract["params"])
    state = train.init_state(model, tx, config, mesh)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(
        train.make_train_step(model, tx, schedule, config),
        in_shardings=(replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    placed = jax.device_put(batch, sharded)
    start = time.perf_counter()
    compiled = step.lower(state, placed).compile()
    compile_s = time.perf_counter() - start
    return compiled, state, placed, compile_s, model, abstract


class StepTimer:
    """One compiled train step and its state, timed a step at a time (after one warm-up)."""

    def __init__(self, config, batch):
        self.compiled, self.state, self.batch, self.compile_s, model, abstract = build_step(
            config, batch
        )
        self.times: list[float] = []
        shape = (int(config.train.global_batch_size), *config.data.crop_size, 3)
        image = jax.ShapeDtypeStruct(shape, jnp.float32)  # the model's input, either path
        self.outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract, image)
        self.run()  # warm-up

    def run(self) -> float:
        start = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.metrics)
        return time.perf_counter() - start

    def time(self) -> None:
        self.times.append(self.run())

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_step(config, batch, repeats):
    """(compile s, median step s, PNE pairs of the last step, output shapes)."""
    timer = StepTimer(config, batch)
    for _ in range(repeats):
        timer.time()
    return timer.compile_s, timer.median, float(timer.metrics["pne_pairs"]), timer.outputs


def time_pne_alone(config, outputs, repeats):
    """Forward + backward of the PNE loss alone on the step's logits/embeddings shapes."""
    b, h, w, c = outputs["logits"].shape
    d = outputs["embeddings"].shape[-1]
    logits, labels, emb = realistic_batch(np.random.default_rng(0), b, h, w, c, d)
    kwargs = train.pne_options(config)
    grad = jax.jit(jax.grad(lambda e, lg, lb: pne_loss(lg, lb, e, **kwargs)))
    args = [jax.device_put(x) for x in (emb, logits, labels)]
    return median_time(grad, *args, repeats=repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated name[:arg]")
    parser.add_argument("--full", action="store_true", help="each config's crop and batch")
    parser.add_argument("--crop", default="128,256", help="reduced crop (H,W) without --full")
    parser.add_argument("--batch", type=int, default=2, help="reduced batch without --full")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each, alternating")
    parser.add_argument("--augment_on", default="host", choices=input_pipeline.AUGMENT_ON)
    parser.add_argument("--input_paths", action="store_true", help="time each input path")
    parser.add_argument("--workers", type=int, default=2, help="grain processes (--input_paths)")
    parser.add_argument("--examples", type=int, default=16, help="fake set (--input_paths)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {len(jax.devices())} x {device.device_kind}")
    if args.input_paths:
        for spec in args.configs.split(","):
            for dtype in args.dtypes.split(","):
                time_input_paths(spec, dtype, args)
        return
    print(
        f"| {'config':<24} | {'dtype':<8} | {'crop':<9} | batch | compile s on/off | "
        f"PNE on ms | PNE off ms | on/off | img/s on/off | on-off share | PNE alone ms | "
        f"alone share |"
    )
    print("|" + "---|" * 12)
    for spec in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            config = load_config(spec)
            config.model.dtype = dtype
            if not args.full:
                config.data.crop_size = tuple(int(x) for x in args.crop.split(","))
                config.train.global_batch_size = args.batch
            set_augment_on(config, args.augment_on, args.full)
            crop = tuple(config.data.crop_size)
            batch_size = int(config.train.global_batch_size)
            if args.augment_on == "device":
                batch = device_batch(config, batch_size, config.model.num_classes)
            else:
                batch = random_batch(
                    np.random.default_rng(0), batch_size, crop, config.model.num_classes
                )
            on = StepTimer(config, batch)
            off_config = load_config(spec)
            off_config.update_from_flattened_dict(
                {"model.dtype": dtype, "pne.enabled": False, **_sizes(config)}
            )
            off = StepTimer(off_config, batch)
            for _ in range(args.repeats):  # alternate, so load changes hit both alike
                on.time()
                off.time()
            alone = time_pne_alone(config, on.outputs, args.repeats)
            paired = statistics.median(a - b for a, b in zip(on.times, off.times, strict=True))
            print(
                f"| {spec:<24} | {dtype:<8} | {crop[0]:>4}x{crop[1]:<4} | {batch_size:>5} | "
                f"{on.compile_s:.1f} / {off.compile_s:.1f} | {on.median * 1e3:.1f} | "
                f"{off.median * 1e3:.1f} | {on.median / off.median:.3f} | "
                f"{batch_size / on.median:.2f} / {batch_size / off.median:.2f} | "
                f"{100 * paired / on.median:.1f}% | {alone * 1e3:.1f} | "
                f"{100 * alone / on.median:.1f}% |",
                flush=True,
            )
            del on, off


def _sizes(config) -> dict:
    return {
        "data.crop_size": tuple(config.data.crop_size),
        "data.base_size": tuple(config.data.base_size),
        "data.augment_on": config.data.augment_on,
        "data.device_source_size": tuple(config.data.device_source_size),
        "train.global_batch_size": int(config.train.global_batch_size),
    }


def time_input_paths(spec: str, dtype: str, args) -> None:
    """The trainer's loop (dispatch step k, then fetch batch k + 1) on the real pipeline for
    each input path, alternating blocks of steps with the same step on a fixed device batch."""
    config = load_config(spec)
    config.model.dtype = dtype
    config.data.num_workers = args.workers
    if not args.full:
        config.data.crop_size = tuple(int(x) for x in args.crop.split(","))
        config.train.global_batch_size = args.batch
    size = tuple(2 * s for s in config.data.crop_size) if not args.full else (1024, 2048)
    data_dir = tempfile.mkdtemp(prefix="bench_train_input_")
    batch_size, mesh = int(config.train.global_batch_size), train.make_mesh()
    print(f"\n{spec}, {dtype}, batch {batch_size} of {config.data.crop_size}, images {size}, "
          f"{args.workers} grain workers, {os.cpu_count()} CPUs")  # fmt: skip
    print("| storage | augmentation | ms / step (pipeline) | ms / step (fixed batch) | "
          "img/s | waiting for input |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for storage, where in PATHS:
        cfg = load_config(spec)
        cfg.update_from_flattened_dict({"model.dtype": dtype, **_sizes(config)})
        cfg.data.num_workers = args.workers
        set_augment_on(cfg, where, full=True)
        cfg.data.device_source_size = size
        if not args.full:
            cfg.data.base_size = (max(size), min(size))
        source = prepare_fake(data_dir, args.examples, storage, size).as_data_source("train")
        batches = input_pipeline.train_iterator(cfg, source=source)
        try:
            first = next(batches)
            timer = StepTimer(cfg, first)
            waits, pipeline, fixed = [], [], []
            for _ in range(2):  # alternate blocks, so load changes hit both alike
                jax.block_until_ready(timer.state)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    batch = input_pipeline.to_global_array(next(batches), mesh)
                    waits.append(time.perf_counter() - t)
                    timer.state, timer.metrics = timer.compiled(timer.state, batch)
                jax.block_until_ready(timer.metrics)
                pipeline.append((time.perf_counter() - start) / args.repeats)
                for _ in range(args.repeats):
                    timer.time()
                fixed.append(statistics.median(timer.times[-args.repeats :]))
        finally:
            batches.close()
        step, base = statistics.median(pipeline), statistics.median(fixed)
        wait = sum(waits) / len(pipeline) / args.repeats
        print(f"| {storage} | {where} | {step * 1e3:.1f} | {base * 1e3:.1f} | "
              f"{batch_size / step:.1f} | {100 * wait / step:.1f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
