"""Our train step against the PyTorch reference set-up, side by side in one run.

The same DeepLabV3-R101-D8 (auxiliary FCN head on stage 3 at weight 0.4, PNE projection
head 512 -> 512 -> 256) forward + backward + SGD step (momentum 0.9, weight decay 5e-4),
on the same random batch, in
- pne-jax: the trainer's own step (`train.make_train_step` from
  `configs/cityscapes_deeplab.py`, state donated), with PNE off (the headline ratio) and on;
- PyTorch: a plain `torch.nn` transcription of MMSegmentation's model (ResNetV1c-101 with
  the deep stem, stride on the 3x3, dilations 2/4 in stages 3/4, output stride 8; ASPPHead
  with image pooling, a 1x1 and 3x3 branches at 12/24/36, 512 channels, 3x3 bottleneck;
  FCNHead aux; the projection head), `channels_last`, `torch.compile` unless
  `--no-torch_compile` (falls back to eager, saying why, if compiling fails), CE on the
  upsampled logits (ignore 255, averaged over all pixels as MMSegmentation 0.13) + 0.4 x
  the aux CE, no PNE (and no projection forward, whose output nothing would use).
`--dtype=bfloat16` (the default on GPUs) is `config.model.dtype` here (f32 master weights)
and `torch.autocast(dtype=torch.bfloat16)` there; on CPUs the default is float32.

Before timing it refuses to compare models that differ: the parameter counts must agree to
0.5% (else it prints both per module) and the convolution FLOPs of one step to 2%. FLOPs
are counted the same way on both sides, as 2 x multiply-adds of the convolutions of the
forward and backward pass (the model's FLOPs): PyTorch's `FlopCounterMode` over an eager
step (convolution forward, input and weight gradients); ours by walking the HLO that JAX
lowers for the step (live `convolution` instructions only, after removing dead code:
2 x output size x kernel window x input features per group, an input gradient of a strided
conv counted like its forward). XLA's own cost analysis (which adds elementwise work,
BatchNorm and the bilinear upsampling's matmuls) is printed beside it. Its GPU analysis
omits cuDNN convolutions, so both counts come from the step lowered for the CPU.

Timing: one warm-up step each (torch: three, for compilation), then `--steps` rounds that
run one step of each framework in turn (ours without PNE, torch, ours with PNE), synced
after each; medians. Printed: images/s, the ratio ours / torch (above 1: ours faster),
achieved TFLOP/s and MFU on the convolution FLOPs (peak from `PEAK_TFLOPS` by device
kind; n/a on CPUs), and peak memory (GPU: the allocators' peaks; CPU: XLA's compiled
estimate, torch n/a).

    python -m benchmarks.bench_vs_torch                               # CPU: 2x128x256, f32
    python -m benchmarks.bench_vs_torch --crop=256,512 --steps=10     # CPU, larger
    python -m benchmarks.bench_vs_torch --crop=64,128 --no-torch_compile --steps=5  # quick
    python -m benchmarks.bench_vs_torch --full          # GPU: 8x512x1024, bf16, 20 steps
    python -m benchmarks.bench_vs_torch --full --dtype=float32

Needs torch (requirements-bench.txt); not torchvision.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import statistics
import time

# Both frameworks share the GPU: JAX must not preallocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 (after the environment variable)
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax.sharding import SingleDeviceSharding
from torch import nn

from benchmarks import hlo
from benchmarks.bench_train import StepTimer, load_config, random_batch
from pne_jax import optim, train
from pne_jax.models import build_model

# Dense peak TFLOP/s (bfloat16, float32) by device-kind substring, first match wins. The
# float32 column is TF32 on GPUs that have it: PyTorch's cuDNN convolutions and XLA's
# default precision both use it for float32. None: no such mode.
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("T4", (None, 8.1)),
    ("V100", (None, 15.7)),
    ("TPU v6", (918.0, None)),
    ("TPU v5p", (459.0, None)),
    ("TPU v5", (197.0, None)),  # v5e ("TPU v5 lite")
    ("TPU v4", (275.0, None)),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for key, (bf16, f32) in PEAK_TFLOPS:
        if key in device_kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


# --- The PyTorch model ---------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1, stride: int = 1):
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes)
            )
            if downsample
            else None
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ResNetV1c(nn.Module):
    """MMSegmentation's ResNetV1c, output stride 8 (dilations 1, 1, 2, 4, contracted)."""

    def __init__(self, depths=(3, 4, 23, 3)):
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn_relu(3, 32, 3, stride=2), conv_bn_relu(32, 32, 3), conv_bn_relu(32, 64, 3)
        )
        self.pool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for stage, (depth, stride, dilation) in enumerate(
            zip(depths, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)
        ):
            planes = 64 * 2**stage
            blocks = []
            for i in range(depth):
                first = i == 0
                blocks.append(
                    Bottleneck(
                        cin,
                        planes,
                        stride if first else 1,
                        max(dilation // 2, 1) if first else dilation,
                        first and (stride != 1 or cin != 4 * planes),
                    )
                )
                cin = 4 * planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        x = self.pool(self.stem(x))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return c1, c2, c3, self.layer4(c3)


class ASPPHead(nn.Module):
    def __init__(self, num_classes: int, cin=2048, channels=512, dilations=(1, 12, 24, 36)):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, channels, 1))
        self.aspp = nn.ModuleList(
            conv_bn_relu(cin, channels, 1 if d == 1 else 3, dilation=d) for d in dilations
        )
        self.bottleneck = conv_bn_relu((len(dilations) + 1) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[2:])  # bilinear from 1x1
        feats = self.bottleneck(torch.cat([pooled, *(b(x) for b in self.aspp)], dim=1))
        return self.conv_seg(self.dropout(feats)), feats


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv + BN + ReLU to 256 on stage 3, no concat."""

    def __init__(self, num_classes: int, cin=1024, channels=256):
        super().__init__()
        self.convs = conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class DeepLabV3(nn.Module):
    def __init__(self, num_classes: int = 19):
        super().__init__()
        self.backbone = ResNetV1c()
        self.decode_head = ASPPHead(num_classes)
        self.aux_head = FCNHead(num_classes)
        self.projection = nn.Sequential(conv_bn_relu(512, 512, 1), nn.Conv2d(512, 256, 1))

    def forward(self, x, project: bool = False):
        features = self.backbone(x)
        logits, feats = self.decode_head(features[3])
        aux = self.aux_head(features[2])
        return logits, aux, (self.projection(feats) if project else None)


def torch_loss(model, images, labels, aux_weight: float = 0.4):
    """CE of the logits upsampled to the labels (ignore 255, mean over all pixels, as
    MMSegmentation 0.13) + aux_weight x the aux head's."""
    logits, aux, _ = model(images)
    size = labels.shape[-2:]

    def ce(x):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(x.float(), labels, ignore_index=255, reduction="none").mean()

    return ce(logits) + aux_weight * ce(aux)


class TorchStep:
    """One SGD step of the PyTorch model (channels_last, optional autocast and compile)."""

    def __init__(self, batch: dict, dtype: str, device: str, compile_: bool):
        torch.manual_seed(0)
        self.device = device
        self.model = DeepLabV3().to(device).to(memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            **({"fused": True} if device == "cuda" else {"foreach": True}),
        )
        image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        self.images = image.to(device).contiguous(memory_format=torch.channels_last)
        self.labels = torch.from_numpy(batch["label"]).long().to(device)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        self.loss_fn = torch_loss
        self.compiled = False
        if compile_:
            try:
                self.loss_fn = torch.compile(torch_loss)
                self.run()
                self.compiled = True
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back
                print(
                    f"torch.compile failed, timing eager PyTorch: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}"
                )
                self.loss_fn = torch_loss
        self.times: list[float] = []

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def run(self) -> float:
        self.sync()
        start = time.perf_counter()
        with self.autocast:
            loss = self.loss_fn(self.model, self.images, self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - start

    def time(self):
        self.times.append(self.run())

    def conv_flops(self) -> float:
        """Convolution FLOPs of one eager forward + backward (FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, self.autocast:
            torch_loss(self.model, self.images, self.labels).backward()
        self.optimizer.zero_grad(set_to_none=True)
        flops = counter.get_flop_counts()["Global"]
        other = {str(k): v for k, v in flops.items() if "convolution" not in str(k)}
        if other:
            print(f"torch FlopCounterMode also counted (not compared): {other}")
        return float(sum(v for k, v in flops.items() if "convolution" in str(k)))


def torch_param_groups(model: nn.Module) -> dict[str, int]:
    groups: dict[str, int] = collections.Counter()
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = parts[0] + ("/" + parts[1] if parts[0] == "backbone" else "")
        groups[key.replace("backbone/pool", "backbone/stem")] += p.numel()
    return dict(groups)


def jax_param_groups(params) -> dict[str, int]:
    groups: dict[str, int] = collections.Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        key = keys[0]
        if key == "backbone":
            stage = keys[1].split("_")[0]
            key += "/" + (stage if stage.startswith("layer") else "stem")
        groups[key] += leaf.size
    return dict(groups)


# --- FLOPs of our step from its HLO --------------------------------------------------------


def hlo_conv_flops(text: str) -> dict[str, float]:
    """{'conv': FLOPs of live convolutions, 'dot': of live dots} in HLO text (unoptimised or
    compiled; cuDNN convolution custom-calls included). Dead code (unreachable from the
    entry's ROOT) is skipped; a live instruction makes every computation it calls live."""
    module = hlo.parse(text)
    shapes = module.instruction_types()
    live_comps, todo = set(), [module.entry]
    totals = {"conv": 0.0, "dot": 0.0}
    while todo:
        comp = todo.pop()
        if comp in live_comps or comp not in module.computations:
            continue
        live_comps.add(comp)
        instrs = module.computations[comp].instructions
        # In the entry, only what the root needs; called computations count entirely.
        if comp == module.entry:
            live, stack = set(), [module.computations[comp].root]
            while stack:
                n = stack.pop()
                if n in live or n not in instrs:
                    continue
                live.add(n)
                stack.extend(instrs[n].operands)
        else:
            live = set(instrs)
        for n in live:
            info = instrs[n]
            todo.extend(c for called in info.called.values() for c in called)
            totals["conv"] += _conv_flops(info, shapes)
            if info.opcode == "dot":
                totals["dot"] += _dot_flops(info, shapes)
    return totals


def _conv_flops(info: hlo.Instruction, shapes: dict) -> float:
    body, opcode = info.body, info.opcode
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", body)
    if labels is None:
        return 0.0
    rhs_labels = labels.group(2)
    ops = [hlo.dims(shapes.get(o, "")) for o in info.operands]
    result = hlo.dims(info.type)
    if opcode == "convolution":
        # Each output element sums over the kernel window and its input features.
        rhs = ops[1]
        flops = 2.0 * math.prod(result) * math.prod(rhs) / rhs[rhs_labels.index("o")]
        dilate = re.search(r"lhs_dilate=([\dx]+)", body)
        if dilate:  # an input gradient of a strided conv: count it like its forward
            flops /= math.prod(int(d) for d in dilate.group(1).split("x"))
        return flops
    target = re.search(r'custom_call_target="([^"]+)"', body)
    if opcode != "custom-call" or target is None or "cudnn$conv" not in target.group(1):
        return 0.0
    name = target.group(1)
    if "BackwardInput" in name:
        out, kernel = ops[0], ops[1]
    elif "BackwardFilter" in name:
        out, kernel = ops[1], result
    else:
        out, kernel = result, ops[1]
    return 2.0 * math.prod(out) * math.prod(kernel) / kernel[rhs_labels.index("o")]


def _dot_flops(info: hlo.Instruction, shapes: dict) -> float:
    lhs = hlo.dims(shapes.get(info.operands[0], ""))
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", info.body)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(hlo.dims(info.type)) * k


def jax_step_flops(config, batch: dict) -> dict[str, float]:
    """Convolution / dot FLOPs (HLO walk) and XLA's cost analysis of the train step,
    lowered for the CPU whatever the default device (no compile)."""
    cpu = SingleDeviceSharding(jax.devices("cpu")[0])
    model = build_model(config.model)
    crop = tuple(config.data.crop_size)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *crop, 3))))
    tx, schedule = optim.build_optimizer(config, abstract["params"])
    mesh = train.make_mesh(jax.devices("cpu")[:1])
    state = jax.eval_shape(lambda: train.init_state(model, tx, config, mesh))
    on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu)  # noqa: E731
    step = jax.jit(train.make_train_step(model, tx, schedule, config))
    lowered = step.lower(jax.tree.map(on_cpu, state), jax.tree.map(on_cpu, batch))
    counts = hlo_conv_flops(lowered.as_text(dialect="hlo"))
    return counts | {"xla": float(lowered.cost_analysis()["flops"])}


# --- The comparison ------------------------------------------------------------------------


def check_same_model(jax_params, torch_model, jax_flops: float, torch_flops: float) -> None:
    ours, theirs = jax_param_groups(jax_params), torch_param_groups(torch_model)
    n_ours, n_theirs = sum(ours.values()), sum(theirs.values())
    print(f"parameters: ours {n_ours / 1e6:.3f} M, torch {n_theirs / 1e6:.3f} M")
    print(f"conv FLOPs per step: ours {jax_flops / 1e9:.1f} G, torch {torch_flops / 1e9:.1f} G")
    problems = []
    if abs(n_ours - n_theirs) > 0.005 * n_theirs:
        rows = [
            f"  {k:<20} ours {ours.get(k, 0):>11,} torch {theirs.get(k, 0):>11,}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k, 0) != theirs.get(k, 0)
        ]
        problems.append("parameter counts differ by more than 0.5%:\n" + "\n".join(rows))
    if abs(jax_flops - torch_flops) > 0.02 * torch_flops:
        problems.append(
            f"convolution FLOPs differ by more than 2%: ours {jax_flops:.4g}, torch "
            f"{torch_flops:.4g}"
        )
    if problems:
        raise SystemExit("refusing to compare different models:\n" + "\n".join(problems))


def _memory_gib_jax(timer: StepTimer) -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} (device peak)"
    m = timer.compiled.memory_analysis()
    if m is None:
        return "n/a"
    total = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return f"{total / 2**30:.2f} (XLA estimate)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="batch 8 at 512x1024 (one GPU)")
    parser.add_argument("--crop", default="128,256", help="crop (H,W) without --full")
    parser.add_argument("--batch", type=int, default=2, help="global batch without --full")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: bfloat16 on GPUs, float32 on CPUs",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each")
    parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--pne",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time our step with PNE",
    )
    args = parser.parse_args(argv)

    platform = jax.devices()[0].platform
    device_kind = jax.devices()[0].device_kind
    torch_device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if platform == "gpu" else "float32")
    batch_size, crop = (
        (8, (512, 1024)) if args.full else (args.batch, tuple(int(x) for x in args.crop.split(",")))
    )
    config = load_config("cityscapes_deeplab")
    config.model.dtype = dtype
    config.data.crop_size = crop
    config.train.global_batch_size = batch_size
    batch = random_batch(np.random.default_rng(0), batch_size, crop, config.model.num_classes)
    print(
        f"DeepLabV3-R101-D8 + aux FCN + projection, {batch_size}x{crop[0]}x{crop[1]}, {dtype}; "
        f"jax {jax.__version__} on {device_kind}, torch {torch.__version__} on {torch_device} "
        f"({torch.get_num_threads()} threads)"
    )

    off_config = config.copy_and_resolve_references()
    off_config.pne.enabled = False
    flops = jax_step_flops(off_config, batch)
    torch_step = TorchStep(batch, dtype, torch_device, args.torch_compile)
    torch_flops = torch_step.conv_flops()
    ours_off = StepTimer(off_config, batch)
    check_same_model(ours_off.state.params, torch_step.model, flops["conv"], torch_flops)
    print(
        f"XLA cost analysis of our step: {flops['xla'] / 1e9:.1f} GFLOPs in all "
        f"(convolutions {flops['conv'] / 1e9:.1f}, dots {flops['dot'] / 1e9:.1f})"
    )
    ours_on = StepTimer(config, batch) if args.pne else None
    for _ in range(2):  # torch: more warm-up (compilation, allocator, autotuning)
        torch_step.run()

    timers = [ours_off, torch_step] + ([ours_on] if ours_on else [])
    for _ in range(args.steps):
        for timer in timers:
            timer.time()

    peak = peak_tflops(device_kind, dtype) if platform != "cpu" else None
    t_torch = statistics.median(torch_step.times)
    torch_name = f"torch{' compiled' if torch_step.compiled else ' eager'}"
    torch_mem = (
        f"{torch.cuda.max_memory_allocated() / 2**30:.2f} (allocator peak)"
        if torch_device == "cuda"
        else "n/a"
    )
    print(f"\nmedians of {args.steps} steps each, alternating; conv FLOPs {flops['conv']:.4g}")
    print("| step | compile s | ms | img/s | vs torch | TFLOP/s (conv) | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("ours, no PNE", ours_off)] + ([("ours, PNE", ours_on)] if ours_on else [])
    rows.insert(1, (torch_name, torch_step))
    for name, timer in rows:
        t = statistics.median(timer.times)
        tflops = flops["conv"] / t / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        compile_s = f"{timer.compile_s:.1f}" if isinstance(timer, StepTimer) else "-"
        memory = _memory_gib_jax(timer) if isinstance(timer, StepTimer) else torch_mem
        print(
            f"| {name} | {compile_s} | {1e3 * t:.1f} | {batch_size / t:.2f} | "
            f"{t_torch / t:.3f}x | {tflops:.3f} | {mfu} | {memory} |"
        )


if __name__ == "__main__":
    main()
