"""Speed and memory of pne_loss (forward + backward) on realistic segmentation batches.

For each class count it prints compile time, the median step time, XLA's compiled
memory estimate, the kept pairs and two ratios measured in the same run on the same
inputs: against the official PyTorch implementation (with --official_repo, needs torch
from requirements-bench.txt) and against the FLOP floor, one batched matmul with the
FLOP count of the kept pairs' anchor-by-positive and anchor-by-negative products.
The last columns time the ICCV 2021 pixel contrast (`pixel_contrast_loss`, official
Cityscapes settings: 1024 samples, 100 views) on the same inputs, side by side.

    python -m benchmarks.bench_loss --official_repo=PATH/TO/PNE_Loss
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pne_jax import pne_loss
from pne_jax.losses import pixel_contrast_loss, pne_batch_stats


def realistic_batch(rng, b, h, w, c, d, *, classes_per_image=12, patches=24):
    """Labels as blobs, logits mostly right with misclassified patches, as in training.

    Each image has `classes_per_image` classes laid out as Voronoi blobs, 5% ignored
    pixels, and `patches` rectangles predicted as another class present in the image
    (or, one time in four, a class absent from it).
    """
    labels = np.empty((b, h, w), np.int32)
    pred = np.empty((b, h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for i in range(b):
        present = rng.choice(c, size=min(c, classes_per_image), replace=False)
        # One seed per blob: each present class once plus 2 * classes_per_image more.
        seeds = rng.integers(0, [h, w], size=(len(present) + 2 * classes_per_image, 2))
        seed_class = np.concatenate([present, rng.choice(present, 2 * classes_per_image)])
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        labels[i] = seed_class[np.argmin(dist, axis=-1)]
        pred[i] = labels[i]
        for _ in range(patches):
            ph, pw = rng.integers(2, max(3, h // 6)), rng.integers(2, max(3, w // 6))
            y0, x0 = rng.integers(0, h - ph), rng.integers(0, w - pw)
            wrong = rng.choice(present) if rng.random() < 0.75 else rng.integers(c)
            pred[i, y0 : y0 + ph, x0 : x0 + pw] = wrong
    labels[rng.random(labels.shape) < 0.05] = 255
    logits = rng.normal(size=(b, h, w, c)).astype(np.float32)
    logits += 4.0 * np.eye(c, dtype=np.float32)[pred]
    emb = rng.normal(size=(b, h, w, d)).astype(np.float32)
    return logits, labels, emb


def median_time(fn, *args, repeats):
    """Median seconds of `repeats` calls of fn(*args), after one warm-up call."""
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile_and_time(loss_and_grad, args, repeats):
    """(compile s, median step s, XLA's peak bytes) of a jitted function of `args`."""
    start = time.perf_counter()
    compiled = loss_and_grad.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return compile_s, median_time(compiled, *args, repeats=repeats), peak


def bench_jax(logits, labels, emb, num_samples, repeats):
    # Inputs are arguments, not closed-over constants, as in a train step.
    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda lg, lb, e: pne_loss(lg, lb, e, num_samples=num_samples), argnums=2
        )
    )
    args = [jax.device_put(x) for x in (logits, labels, emb)]
    compile_s, step_s, peak = _compile_and_time(loss_and_grad, args, repeats)
    stats = pne_batch_stats(logits, labels, emb, num_samples=num_samples)
    return compile_s, step_s, peak, stats


def bench_pixel_contrast(logits, labels, emb, repeats):
    """(compile s, step s, peak bytes) of the pixel contrast's forward + backward."""
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda k, lg, lb, e: pixel_contrast_loss(k, lg, lb, e), argnums=3)
    )
    args = [jax.random.key(0), *(jax.device_put(x) for x in (logits, labels, emb))]
    return _compile_and_time(loss_and_grad, args, repeats)


def bench_floor(num_pairs, num_samples, dim, repeats):
    """One batched matmul: each pair's S anchors against its S positives and S negatives."""
    key = jax.random.key(0)
    anchors = jax.random.normal(key, (num_pairs, num_samples, dim))
    others = jax.random.normal(key, (num_pairs, dim, 2 * num_samples))
    matmul = jax.jit(
        lambda a, o: jnp.einsum("psd,pdt->pst", a, o, precision=jax.lax.Precision.HIGHEST)
    )
    return median_time(matmul, anchors, others, repeats=repeats)


def bench_official(repo, logits, labels, emb, num_samples, repeats, device):
    import torch

    from benchmarks.official_pne import make_official_loss, official_pne_loss

    loss = make_official_loss(repo, num_samples=num_samples)

    def step():
        value, tensor = official_pne_loss(
            loss, logits, labels, emb, device=device, requires_grad=True
        )
        value.backward()
        if device != "cpu":
            torch.cuda.synchronize()
        return float(value), tensor.grad

    value, grad = step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value, grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="19,150,171", help="comma-separated class counts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num_samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--official_repo", default=None, help="root of a clone of jingw193/PNE_Loss to compare"
    )
    parser.add_argument(
        "--official_device", default="cpu", help="torch device for the official code"
    )
    args = parser.parse_args(argv)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; B={args.batch} "
        f"h={args.height} w={args.width} D={args.dim} S={args.num_samples}"
    )
    header = (
        f"{'C':>4} {'pairs':>6} {'compile s':>9} {'step ms':>8} {'peak MiB':>8} "
        f"{'floor ms':>8} {'x floor':>7} {'official ms':>11} {'speed-up':>8} {'rel. diff':>9} "
        f"{'contrast ms':>11} {'contrast MiB':>12}"
    )
    print(header)
    rng = np.random.default_rng(args.seed)
    for c in (int(x) for x in args.classes.split(",")):
        logits, labels, emb = realistic_batch(rng, args.batch, args.height, args.width, c, args.dim)
        compile_s, step_s, peak, stats = bench_jax(
            logits, labels, emb, args.num_samples, args.repeats
        )
        pairs = int(stats.num_pairs.sum())
        floor_s = bench_floor(max(pairs, 1), args.num_samples, args.dim, args.repeats)
        official = "-"
        speedup = "-"
        diff = "-"
        if args.official_repo:
            off_s, off_value, _ = bench_official(
                args.official_repo,
                logits,
                labels,
                emb,
                args.num_samples,
                max(1, args.repeats // 2),
                args.official_device,
            )
            ours = float(pne_loss(logits, labels, emb, num_samples=args.num_samples))
            official = f"{off_s * 1e3:.1f}"
            speedup = f"{off_s / step_s:.1f}x"
            diff = f"{abs(ours - off_value) / max(abs(off_value), 1e-30):.1e}"
        _, contrast_s, contrast_peak = bench_pixel_contrast(logits, labels, emb, args.repeats)
        print(
            f"{c:>4} {pairs:>6} {compile_s:>9.2f} {step_s * 1e3:>8.1f} {peak / 2**20:>8.1f} "
            f"{floor_s * 1e3:>8.1f} {step_s / floor_s:>7.2f} {official:>11} {speedup:>8} {diff:>9} "
            f"{contrast_s * 1e3:>11.1f} {contrast_peak / 2**20:>12.1f}"
        )


if __name__ == "__main__":
    main()
