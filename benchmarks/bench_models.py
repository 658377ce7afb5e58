"""Size, FLOPs and speed of the paper's segmentors (with the PNE projection head).

For each model: the parameter count (with and without the projection head; the latter
is comparable to published counts, which include auxiliary heads); the forward FLOPs at
the benchmark size, from XLA's cost analysis of the compiled eval-mode forward built for
the CPU (whatever the device: see `_cpu_forward_flops`); the forward GMACs without the
projection head at the published measurement size (the lowered HLO's analysis: no
compile); the compile time, the temporary memory XLA plans and the median time of a
jitted train-mode forward + backward on the default device (warm-up excluded).
Published counts are listed beside ours where we found them. MMCV's counter reports
multiply-accumulates, XLA two FLOPs per multiply-add, so the comparable column is
GMACs = FLOPs / 2; XLA also counts elementwise work (BatchNorm, activations, softmax)
and attention matmuls, which MMCV's counter skips, so ours come out a few % higher.

    python -m benchmarks.bench_models                 # CPU: 128x256, batch 1
    python -m benchmarks.bench_models --full          # GPU/TPU: 512x1024, batch 2
    python -m benchmarks.bench_models --models=fcn_hrnetv2_w48_cityscapes,upernet_swin_t_ade20k
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import SingleDeviceSharding

from pne_jax.models import build_model

# name: (model config, published measurement size (H, W)).
MODELS = {
    "deeplabv3_r101_d8_cityscapes": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=19),
        (1024, 2048),
    ),
    "fcn_hrnetv2_w48_cityscapes": (
        dict(backbone="hrnetv2_w48", decode_head="fcn", num_classes=19),
        (1024, 2048),
    ),
    "ocrnet_hrnetv2_w48_cityscapes": (
        dict(backbone="hrnetv2_w48", decode_head="ocr", num_classes=19),
        (1024, 2048),
    ),
    "deeplabv3_r101_d8_ade20k": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=150),
        (512, 512),
    ),
    "deeplabv3_r101_d8_cocostuff": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=171),
        (512, 512),
    ),
    # The Swin repo does not say at which size; 512x2048 is the one its FLOPs match (at
    # 2048x1024, MMSegmentation's get_flops default, we count 2.05x theirs).
    "upernet_swin_t_ade20k": (
        dict(backbone="swin_tiny", decode_head="uper", num_classes=150),
        (512, 2048),
    ),
    "upernet_swin_b_ade20k": (
        dict(backbone="swin_base", decode_head="uper", num_classes=150),
        (512, 2048),
    ),
}

# Published (params in M, GMACs at the size above); None where we found none.
PUBLISHED = {
    # HRNet TPAMI paper (Wang et al. 2020), Cityscapes comparison table: 65.9M.
    "fcn_hrnetv2_w48_cityscapes": (65.9, None),
    # OCR paper (Yuan et al., ECCV 2020): HRNetV2-W48 + OCR, 70.3M.
    "ocrnet_hrnetv2_w48_cityscapes": (70.3, None),
    # github.com/SwinTransformer/Swin-Transformer-Semantic-Segmentation README (ADE20K,
    # UPerNet, MMSegmentation 0.11 get_flops): Swin-T 60M / 945G, Swin-B 121M / 1188G
    # (their Swin-B row is window 7; ours is window 12, as the 22K-384 config).
    "upernet_swin_t_ade20k": (60.0, 945.0),
    "upernet_swin_b_ade20k": (121.0, 1188.0),
}


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def _random_variables(model, x):
    """Variables of `model.init`'s shapes, drawn in numpy (compiling HRNet's init alone
    takes minutes on a small CPU): kernels N(0, 1/fan_in), scales and variances 1."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return jnp.asarray(
                rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype
            )
        if name.endswith("['var']") or name.endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _cpu_forward_flops(model, batch: int, size: tuple[int, int], compile: bool) -> float:
    """FLOPs of the eval forward from XLA's cost analysis of the program built for the
    CPU, whatever the default device: GPU backends leave convolutions that run as cuDNN
    calls out of their analysis (on an H200 it reported 4.7 GFLOPs for DeepLabV3 at
    2x512x1024), and analyse only compiled programs. `compile=False` analyses the
    lowered HLO instead (no compile; 1% below the compiled count for DeepLabV3)."""
    cpu = SingleDeviceSharding(jax.devices("cpu")[0])
    x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32, sharding=cpu)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), shapes)
    lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x)
    return (lowered.compile() if compile else lowered).cost_analysis()["flops"]


def bench(name: str, batch: int, size: tuple[int, int], repeats: int, dtype: str) -> dict:
    config, published_size = MODELS[name]
    model = build_model(ml_collections.ConfigDict(dict(config, dtype=dtype)))
    x = jax.random.normal(jax.random.key(0), (batch, *size, 3))
    variables = _random_variables(model, x)
    params = variables["params"]
    total = _count(params)
    no_proj = total - _count(params.get("projection", {}))

    flops = _cpu_forward_flops(model, batch, size, compile=True)
    # Published counts exclude the PNE projection head: measure the model without it.
    bare = build_model(ml_collections.ConfigDict(dict(config, dtype=dtype, projection=False)))
    ref_gmacs = _cpu_forward_flops(bare, 1, published_size, compile=False) / 2e9

    def loss_fn(p, state, x):
        out, new_state = model.apply(
            {"params": p, **state},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )
        # A stand-in for the losses: every output contributes to the backward pass.
        loss = sum(jnp.mean(jnp.square(o)) for o in jax.tree.leaves(out))
        return loss, new_state

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    state = {k: v for k, v in variables.items() if k != "params"}
    start = time.perf_counter()
    step = step.lower(params, state, x).compile()
    compile_s = time.perf_counter() - start
    memory = step.memory_analysis()
    temp_gib = None if memory is None else memory.temp_size_in_bytes / 2**30
    jax.block_until_ready(step(params, state, x))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, state, x))
        times.append(time.perf_counter() - start)
    return dict(
        params=total / 1e6,
        params_no_proj=no_proj / 1e6,
        gflops=flops / 1e9,
        ref_gmacs=ref_gmacs,
        ref_size=published_size,
        compile_s=compile_s,
        step_ms=1e3 * statistics.median(times),
        temp_gib=temp_gib,
    )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="512x1024, batch 2 (accelerators)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    batch, size = (2, (512, 1024)) if args.full else (1, (128, 256))
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")

    print(
        f"device: {jax.devices()[0].device_kind}, input {batch}x{size[0]}x{size[1]}, {args.dtype}"
    )
    header = (
        "| model | params M (w/o proj) | published M | fwd GFLOPs | GMACs w/o proj @ ref size "
        "| published GMACs | compile s | fwd+bwd ms | fwd+bwd temp GiB |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name in names:
        r = bench(name, batch, size, args.repeats, args.dtype)
        pub_params, pub_gmacs = PUBLISHED.get(name, (None, None))
        ref = f"{r['ref_gmacs']:.1f} @ {r['ref_size'][0]}x{r['ref_size'][1]}"
        print(
            f"| {name} | {r['params']:.2f} ({r['params_no_proj']:.2f}) | "
            f"{_fmt(pub_params, '.1f')} | {r['gflops']:.1f} | {ref} | "
            f"{_fmt(pub_gmacs, '.0f')} | {r['compile_s']:.1f} | {r['step_ms']:.0f} | "
            f"{_fmt(r['temp_gib'], '.2f')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
