"""Train-step speed of the paper's configs, and the share of the step spent in PNE.

For each config it times the jitted train step (median after warm-up; compile time apart)
with PNE on and off, in float32 and bfloat16, on random data, and prints images/s and the
PNE share of the step (target: under 3%) two ways: `(t_on - t_off) / t_on`, which on a noisy
CPU is within the noise, and the PNE loss alone (forward + backward, on realistic labels at
the step's feature shapes) over the step time. By default on CPU it uses a reduced crop and
batch; `--full` uses each config's own crop and batch (GPU/TPU runs).

    python -m benchmarks.bench_train                      # CPU, reduced sizes
    python -m benchmarks.bench_train --full --configs=cityscapes_deeplab,ade20k_upernet_swin:tiny
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.bench_loss import realistic_batch
from pne_jax import optim, train
from pne_jax.losses import pne_loss
from pne_jax.models import build_model

DEFAULT_CONFIGS = "demo,cityscapes_deeplab,ade20k_upernet_swin:tiny"


def load_config(spec: str):
    name, _, arg = spec.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


def random_batch(rng, batch, crop, num_classes):
    """Images and blob labels with some misclassification, so PNE has pairs to work on."""
    h, w = crop
    coarse = rng.integers(0, num_classes, size=(batch, h // 32 + 1, w // 32 + 1))
    labels = coarse.repeat(32, 1).repeat(32, 2)[:, :h, :w]
    labels[rng.random(labels.shape) < 0.05] = 255
    images = rng.normal(size=(batch, h, w, 3)).astype(np.float32)
    return {"image": images, "label": labels.astype(np.int32)}


def time_step(config, batch, repeats):
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
    state, metrics = compiled(state, placed)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, placed)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract, placed["image"])
    return compile_s, statistics.median(times), float(metrics["pne_pairs"]), outputs


def time_pne_alone(config, outputs, repeats):
    """Forward + backward of the PNE loss alone on the step's logits/embeddings shapes."""
    b, h, w, c = outputs["logits"].shape
    d = outputs["embeddings"].shape[-1]
    logits, labels, emb = realistic_batch(np.random.default_rng(0), b, h, w, c, d)
    kwargs = train.pne_options(config)
    grad = jax.jit(jax.grad(lambda e, lg, lb: pne_loss(lg, lb, e, **kwargs)))
    args = [jax.device_put(x) for x in (emb, logits, labels)]
    jax.block_until_ready(grad(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated name[:arg]")
    parser.add_argument("--full", action="store_true", help="each config's crop and batch")
    parser.add_argument("--crop", default="128,256", help="reduced crop (H,W) without --full")
    parser.add_argument("--batch", type=int, default=2, help="reduced batch without --full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {len(jax.devices())} x {device.device_kind}")
    print(
        f"{'config':>28} {'dtype':>8} {'crop':>9} {'batch':>5} {'compile s':>9} "
        f"{'step ms':>8} {'img/s':>7} {'no-PNE ms':>9} {'on-off':>7} {'PNE ms':>7} "
        f"{'PNE share':>9}"
    )
    for spec in args.configs.split(","):
        for dtype in ("float32", "bfloat16"):
            config = load_config(spec)
            config.model.dtype = dtype
            if not args.full:
                config.data.crop_size = tuple(int(x) for x in args.crop.split(","))
                config.train.global_batch_size = args.batch
            crop = tuple(config.data.crop_size)
            batch_size = int(config.train.global_batch_size)
            batch = random_batch(
                np.random.default_rng(0), batch_size, crop, config.model.num_classes
            )
            compile_s, with_pne, _, outputs = time_step(config, batch, args.repeats)
            alone = time_pne_alone(config, outputs, args.repeats)
            config.pne.enabled = False
            _, without_pne, _, _ = time_step(config, batch, args.repeats)
            difference = (with_pne - without_pne) / with_pne
            print(
                f"{spec:>28} {dtype:>8} {crop[0]:>4}x{crop[1]:<4} {batch_size:>5} "
                f"{compile_s:>9.1f} {with_pne * 1e3:>8.1f} {batch_size / with_pne:>7.2f} "
                f"{without_pne * 1e3:>9.1f} {100 * difference:>6.1f}% {alone * 1e3:>7.1f} "
                f"{100 * alone / with_pne:>8.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
