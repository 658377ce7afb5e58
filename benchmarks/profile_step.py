"""Where the train step's time goes: a jax.profiler trace of the paper's Cityscapes step,
summarised by op category, and a check that the step never waits for its input.

It compiles the trainer's own step (`train.make_train_step`, state donated) for
`--config` (default DeepLabV3-R101-D8 + PNE on Cityscapes), runs a warm-up step, then
traces `--steps` steps with `jax.profiler.trace(..., create_perfetto_trace=True)` into
`--logdir` (open it with TensorBoard's profile plugin, `tensorboard --logdir=LOGDIR`, or
load `plugins/profile/*/perfetto_trace.json.gz` in ui.perfetto.dev). The summary reads the
Perfetto trace back: every executed XLA op (a CPU thunk or a GPU kernel, named by its HLO
instruction) is put in one category from the compiled HLO: the op's named scope
(`loss_pne`, `loss_ce` / `loss_aux`, `optimizer`: set in `pne_jax/train.py`), else what
the instruction (or the fusion it calls) contains (convolution, dot), else layout copies,
else the model's remaining work (BatchNorm, activations, residual adds). Op time is summed
over all threads/streams; "device idle" is the part of each traced step's span during
which no op ran (launch overhead, host work, input waits).

`--input=pipeline` also runs the real input pipeline (grain workers, augmentation) on the
synthetic dataset (prepared on first use, no download) and times, per step, how long the
loop blocks in `next(batches)` while the previous step runs, as the trainer's loop does
(`train_and_evaluate`: async dispatch of step k, then `next()` for step k + 1), against
the same loop on a batch already on the device.

    python -m benchmarks.profile_step                         # CPU: 2x128x256, float32
    python -m benchmarks.profile_step --input=pipeline --steps=5
    python -m benchmarks.profile_step --full --dtype=bfloat16 --logdir=/tmp/profile_full  # GPU
    python -m benchmarks.profile_step --config=ade20k_upernet_swin:tiny --no_pne
    python -m benchmarks.profile_step --cross_entropy --crop=512,1024 --batch=2   # CE alone

`--cross_entropy` times only the step's CE part (main and aux logits at 1/8, bilinear
upsampling to the crop, cross-entropy; forward + backward): `cross_entropy(resize(...))`
against the fused `upsampled_cross_entropy` that `train.losses` uses, alternately.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hlo
from benchmarks.bench_train import (
    build_step,
    device_batch,
    load_config,
    random_batch,
    set_augment_on,
)

CATEGORIES = (
    "convolution / matmul",
    "BN / activations / elementwise (model)",
    "layout copies / transposes",
    "CE + upsample (main + aux)",
    "PNE loss",
    "optimizer",
    "augmentation (augment_on=device)",
    "other (RNG, metrics, bookkeeping)",
)


def parse_hlo(text: str) -> dict:
    """Compiled HLO text -> {instruction: {opcode, op_name, calls, line}} plus, per
    computation, the opcodes it holds under `("computation", name)` and the computations its
    fusions call under `("calls", name)`. A fusion without metadata takes its root's scope."""
    module = hlo.parse(text)
    instructions: dict = {}
    scopes: dict[str, str] = {}  # computation -> op_name of its root (or first named op)
    for comp in module.computations.values():
        instructions[("computation", comp.name)] = {i.opcode for i in comp.instructions.values()}
        instructions[("calls", comp.name)] = set()
        for ins in comp.instructions.values():
            calls = ins.called.get("calls", [None])[0]
            instructions[ins.name] = dict(
                opcode=ins.opcode, op_name=ins.op_name, calls=calls, line=ins.body
            )
            if ins.op_name and (ins.name == comp.root or comp.name not in scopes):
                scopes[comp.name] = ins.op_name
            if calls:
                instructions[("calls", comp.name)].add(calls)
    for info in instructions.values():
        if isinstance(info, dict) and not info["op_name"] and info["calls"] in scopes:
            info["op_name"] = scopes[info["calls"]]
    return instructions


def _contents(instructions: dict, info: dict) -> set[str]:
    """Opcodes of an instruction and of the computations it calls, recursively."""
    ops, todo, seen = {info["opcode"]}, [info.get("calls")], set()
    while todo:
        comp = todo.pop()
        if comp is None or comp in seen:
            continue
        seen.add(comp)
        ops |= instructions.get(("computation", comp), set())
        todo.extend(instructions.get(("calls", comp), ()))
    return ops


def categorise(info: dict | None, instructions: dict) -> str:
    if info is None:
        return CATEGORIES[-1]
    name, line = info["op_name"], info["line"]
    if "loss_pne" in name:
        return "PNE loss"
    if "loss_ce" in name or "loss_aux" in name:
        return "CE + upsample (main + aux)"
    if "optimizer" in name:
        return "optimizer"
    if "/augment/" in name or name.endswith("/augment") or name.startswith("augment/"):
        return "augmentation (augment_on=device)"
    ops = _contents(instructions, info)
    gemm = "cudnn$conv" in line or "cublas" in line or "__cudnn" in line
    if gemm or ops & {"convolution", "dot"}:
        return "convolution / matmul"
    if ops - {"parameter", "copy", "transpose", "bitcast", "reshape", "tuple"} == set():
        if ops & {"copy", "transpose"}:
            return "layout copies / transposes"
    if "Segmentor" in name:
        return "BN / activations / elementwise (model)"
    return CATEGORIES[-1]


def _trace_events(logdir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {logdir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarise(events: list[dict], instructions: dict, num_steps: int) -> dict:
    """Per-category op time (ms per step), and the steps' span and idle time."""
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:" in str(e.get("args", {}).get("name", ""))
    }
    ops = [
        e
        for e in events
        if e.get("ph") == "X"
        and "hlo_op" in e.get("args", {})
        and "step" in str(e["args"].get("hlo_module", ""))
        and (not device_pids or e["pid"] in device_pids)
    ]
    if not ops:
        raise RuntimeError("the trace holds no XLA op events of the step")
    totals: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for e in ops:
        category = categorise(instructions.get(e["args"]["hlo_op"]), instructions)
        totals[category] += e["dur"]
        by_op[(category, e["args"]["hlo_op"])] += e["dur"]
    # Span and busy time per run (one run = one step execution).
    runs = collections.defaultdict(list)
    for e in ops:
        runs[e["args"].get("run_id", "0")].append((e["ts"], e["ts"] + e["dur"]))
    span = busy = 0.0
    for intervals in runs.values():
        intervals.sort()
        span += intervals[-1][1] - intervals[0][0]
        end = -float("inf")
        for lo, hi in intervals:
            if hi > end:
                busy += hi - max(lo, end)
                end = hi
    steps = max(len(runs), 1)
    return dict(
        totals_ms={k: v / 1e3 / steps for k, v in totals.items()},
        top_ops=[(k, v / 1e3 / steps) for k, v in by_op.most_common(12)],
        span_ms=span / 1e3 / steps,
        busy_ms=busy / 1e3 / steps,
        runs=len(runs),
    )


def input_wait(config, compiled, state, placed, steps: int) -> tuple[dict, object]:
    """Per-step wall time of the trainer's loop on the real input pipeline and on a fixed
    device batch, alternating blocks of `steps`, and the time spent blocked in `next()`."""
    from pne_jax import input_pipeline, train

    train.prepare_data(config)
    mesh = train.make_mesh()
    batches = input_pipeline.train_iterator(config)
    for _ in range(2):  # fill the workers' buffers
        next(batches)
    out = dict(pipeline=[], fixed=[], waits=[])
    try:
        for _ in range(2):
            for source in ("pipeline", "fixed"):
                jax.block_until_ready(state)
                start = time.perf_counter()
                for _ in range(steps):
                    if source == "pipeline":
                        t = time.perf_counter()
                        batch = input_pipeline.to_global_array(next(batches), mesh)
                        out["waits"].append(time.perf_counter() - t)
                    else:
                        batch = placed
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                out[source].append((time.perf_counter() - start) / steps)
    finally:
        batches.close()
    return out, state


def compare_cross_entropy(batch: int, crop: tuple[int, int], classes: int, repeats: int):
    """The CE part of the step (main + aux logits at 1/8, upsampled to the crop), forward +
    backward: `cross_entropy(resize(...))` against the fused `upsampled_cross_entropy`,
    timed alternately; medians and XLA's temporary memory."""
    from pne_jax.losses.cross_entropy import cross_entropy, upsampled_cross_entropy
    from pne_jax.models.layers import resize

    rng = np.random.default_rng(0)
    h, w = crop[0] // 8, crop[1] // 8
    logits = [jnp.asarray(rng.normal(size=(batch, h, w, classes)), jnp.float32) for _ in "ab"]
    labels = jnp.asarray(random_batch(rng, batch, crop, classes)["label"])

    def unfused(main, aux, labels):
        return cross_entropy(resize(main, crop), labels) + 0.4 * cross_entropy(
            resize(aux, crop), labels
        )

    def fused(main, aux, labels):
        return upsampled_cross_entropy(main, labels) + 0.4 * upsampled_cross_entropy(aux, labels)

    results = {}
    for name, fn in (("unfused", unfused), ("fused", fused)):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        compiled = step.lower(*logits, labels).compile()
        memory = compiled.memory_analysis()
        results[name] = dict(fn=compiled, times=[], temp=memory.temp_size_in_bytes)
        jax.block_until_ready(compiled(*logits, labels))
    for _ in range(repeats):
        for r in results.values():
            start = time.perf_counter()
            jax.block_until_ready(r["fn"](*logits, labels))
            r["times"].append(time.perf_counter() - start)
    a, b = results["unfused"], results["fused"]
    ta, tb = statistics.median(a["times"]), statistics.median(b["times"])
    print(
        f"CE + upsample (main + aux), forward + backward, {batch}x{crop[0]}x{crop[1]}, "
        f"C={classes}: unfused {1e3 * ta:.1f} ms, temp {a['temp'] / 2**20:.0f} MiB; fused "
        f"{1e3 * tb:.1f} ms, temp {b['temp'] / 2**20:.0f} MiB; speed-up {ta / tb:.2f}x"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="cityscapes_deeplab", help="a shipped config name[:arg], or a file"
    )
    parser.add_argument("--full", action="store_true", help="the config's crop and batch")
    parser.add_argument("--crop", default="128,256", help="reduced crop (H,W) without --full")
    parser.add_argument("--batch", type=int, default=2, help="reduced batch without --full")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no_pne", action="store_true", help="the baseline step (PNE off)")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--logdir", default="/tmp/pne_profile", help="where the trace goes")
    parser.add_argument("--input", default="random", choices=("random", "pipeline"))
    parser.add_argument(
        "--augment_on", default="host", choices=("host", "device"), help="see bench_train"
    )
    parser.add_argument(
        "--cross_entropy",
        action="store_true",
        help="only compare the unfused and fused CE + upsample of the step (see the docstring)",
    )
    args = parser.parse_args(argv)

    config = load_config(args.config)
    config.model.dtype = args.dtype
    config.pne.enabled = not args.no_pne
    if not args.full:
        config.data.crop_size = tuple(int(x) for x in args.crop.split(","))
        config.train.global_batch_size = args.batch
    crop, batch_size = tuple(config.data.crop_size), int(config.train.global_batch_size)
    if args.cross_entropy:
        compare_cross_entropy(batch_size, crop, int(config.model.num_classes), max(args.steps, 5))
        return
    if args.input == "pipeline" and args.augment_on == "device":
        parser.error("--input=pipeline times the host path; bench_train --input_paths has both")
    set_augment_on(config, args.augment_on, args.full)
    if args.augment_on == "device":
        batch = device_batch(config, batch_size, int(config.model.num_classes))
    else:
        batch = random_batch(np.random.default_rng(0), batch_size, crop, config.model.num_classes)
    compiled, state, placed, compile_s, _, _ = build_step(config, batch)
    instructions = parse_hlo(compiled.as_text())
    state, metrics = compiled(state, placed)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, placed)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    with jax.profiler.trace(args.logdir, create_perfetto_trace=True):
        for i in range(args.steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = compiled(state, placed)
        jax.block_until_ready(metrics)
    summary = summarise(_trace_events(args.logdir), instructions, args.steps)

    device = jax.devices()[0].device_kind
    print(
        f"{args.config} {args.dtype} PNE {'off' if args.no_pne else 'on'}, "
        f"{batch_size}x{crop[0]}x{crop[1]} on {device}; compile {compile_s:.1f} s; "
        f"untraced step {1e3 * statistics.median(times):.1f} ms (median of {args.steps})"
    )
    print(f"trace: {args.logdir} (TensorBoard profile plugin; perfetto_trace.json.gz)")
    total = sum(summary["totals_ms"].values())
    print("\n| category | ms / step (op time, all threads) | share of op time |")
    print("|---|---|---|")
    for category in CATEGORIES:
        ms = summary["totals_ms"].get(category, 0.0)
        print(f"| {category} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print(f"| **all ops** | {total:.1f} | 100% |")
    idle = summary["span_ms"] - summary["busy_ms"]
    print(
        f"\nper traced step: span {summary['span_ms']:.1f} ms, some op running "
        f"{summary['busy_ms']:.1f} ms, device idle {idle:.1f} ms "
        f"({100 * idle / max(summary['span_ms'], 1e-9):.1f}%), {summary['runs']} runs"
    )
    print("\nlargest ops (ms / step):")
    for (category, op), ms in summary["top_ops"]:
        info = instructions.get(op, {})
        scope = info.get("op_name", "")[-70:]
        print(f"  {ms:8.1f}  {op:<34} {category:<28} {scope}")

    if args.input == "pipeline":
        data_config = load_config("demo").data
        data_config.crop_size = crop
        config.data = data_config
        timing, state = input_wait(config, compiled, state, placed, args.steps)
        pipe, fixed = statistics.median(timing["pipeline"]), statistics.median(timing["fixed"])
        print(
            f"\ninput: step wall {1e3 * pipe:.1f} ms with the real pipeline (synthetic set, "
            f"{config.data.num_workers} grain workers) vs {1e3 * fixed:.1f} ms on a fixed "
            f"device batch: ratio {pipe / fixed:.3f}; blocked in next(): median "
            f"{1e3 * statistics.median(timing['waits']):.1f} ms, max "
            f"{1e3 * max(timing['waits']):.1f} ms per step"
        )


if __name__ == "__main__":
    main()
