"""ImageNet weights for the backbones, converted from timm checkpoints the user downloaded.

Nothing is fetched at run time: download a timm checkpoint (`.safetensors`, or a `.pth` /
`.bin` state dict, which needs torch to read), convert it once, and point
`config.model.pretrained` at the result:

    pne-jax convert --arch=resnet101c --checkpoint=model.safetensors --out=r101.npz

The conversion is generic plus a small table per architecture. Our modules are named
after timm's (`layer1.0.conv1` -> `layer1_0/conv1`: a numeric part joins the name before
it), so a timm key maps to a variable by name after the architecture's regex renames;
the layout follows from the target: conv weights OIHW -> HWIO, linear weights transposed,
BatchNorm weight/bias/running stats -> scale/bias and batch_stats mean/var. Every key
that matches nothing, every variable left without a value and every shape that differs
is reported at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pne_jax.models import build_backbone
from pne_jax.models.backbones import hrnet, resnet, swin


@dataclasses.dataclass(frozen=True)
class TimmArch:
    """How one timm architecture maps onto one of our backbones."""

    backbone: str  # name for build_backbone
    renames: tuple[tuple[str, str], ...] = ()  # re.sub(pattern, repl) on timm keys, in order
    ignore: tuple[str, ...] = ()  # timm keys (fullmatch) with no counterpart, e.g. classifiers
    fresh: tuple[str, ...] = ()  # our variable paths (fullmatch) that timm lacks: keep init
    source: str = ""  # where the checkpoint comes from (README)


TIMM_ARCHS: dict[str, TimmArch] = {
    "resnet50c": TimmArch(
        "resnet50_v1c",
        resnet.TIMM_RENAMES,
        resnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/resnet50c.gluon_in1k",
    ),
    "resnet101c": TimmArch(
        "resnet101_v1c",
        resnet.TIMM_RENAMES,
        resnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/resnet101c.gluon_in1k",
    ),
    "hrnet_w18": TimmArch(
        "hrnetv2_w18",
        hrnet.TIMM_RENAMES,
        hrnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/hrnet_w18.ms_in1k",
    ),
    "hrnet_w48": TimmArch(
        "hrnetv2_w48",
        hrnet.TIMM_RENAMES,
        hrnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/hrnet_w48.ms_in1k",
    ),
    "swin_tiny_patch4_window7_224": TimmArch(
        "swin_tiny",
        swin.TIMM_RENAMES,
        swin.TIMM_IGNORE,
        swin.TIMM_FRESH,
        source="https://huggingface.co/timm/swin_tiny_patch4_window7_224.ms_in1k",
    ),
    "swin_base_patch4_window12_384": TimmArch(
        "swin_base",
        swin.TIMM_RENAMES,
        swin.TIMM_IGNORE,
        swin.TIMM_FRESH,
        source="https://huggingface.co/timm/swin_base_patch4_window12_384.ms_in22k",
    ),
}

_ALWAYS_IGNORED = (r".*num_batches_tracked",)


def _variable_path(key: str) -> tuple[tuple[str, ...], str]:
    """'layer1.0.conv1.weight' -> (('layer1_0', 'conv1'), 'weight')."""
    *module, leaf = key.split(".")
    tokens: list[str] = []
    for part in module:
        if part.isdigit() and tokens:
            tokens[-1] = f"{tokens[-1]}_{part}"
        else:
            tokens.append(part)
    return tuple(tokens), leaf


def _candidates(module: tuple[str, ...], leaf: str, value: np.ndarray):
    """(our flat variable path, converted value) pairs a timm tensor could become."""
    if leaf == "weight":
        if value.ndim == 4:  # conv: OIHW -> HWIO
            yield ("params", *module, "kernel"), value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # linear: [out, in] -> [in, out]
            yield ("params", *module, "kernel"), value.T
        yield ("params", *module, "scale"), value  # norm layers
    elif leaf == "running_mean":
        yield ("batch_stats", *module, "mean"), value
    elif leaf == "running_var":
        yield ("batch_stats", *module, "var"), value
    else:  # bias and raw parameters keep their name
        yield ("params", *module, leaf), value


def _abstract_variables(model) -> dict:
    image = jnp.zeros((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    return traverse_util.flatten_dict(shapes)


def convert_timm(arch: str, state_dict: Mapping[str, np.ndarray]) -> dict:
    """timm state dict (names -> numpy arrays) -> our backbone's variables.

    Returns `{"params": ..., "batch_stats": ...}` (float32) for
    `build_backbone(TIMM_ARCHS[arch].backbone)`. Variables listed as `fresh` (layers timm
    does not have) are left out; `load_backbone` keeps their initial values. Raises
    ValueError listing every unmatched key, every missing variable and every shape
    mismatch.
    """
    if arch not in TIMM_ARCHS:
        raise ValueError(f"unknown timm architecture {arch!r}; known: {', '.join(TIMM_ARCHS)}")
    spec = TIMM_ARCHS[arch]
    return convert_state_dict(build_backbone(spec.backbone), state_dict, spec, name=arch)


def convert_state_dict(
    model, state_dict: Mapping[str, np.ndarray], spec: TimmArch, name: str = "model"
) -> dict:
    """The conversion behind `convert_timm`, for any backbone module and rule table."""
    target = _abstract_variables(model)
    ignore = [re.compile(p) for p in (*spec.ignore, *_ALWAYS_IGNORED)]
    converted, unexpected, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in ignore):
            continue
        renamed = key
        for pattern, repl in spec.renames:
            renamed = re.sub(pattern, repl, renamed)
        value = np.asarray(value, np.float32)
        for path, candidate in _candidates(*_variable_path(renamed), value):
            if path in target:
                if candidate.shape != target[path].shape:
                    wrong_shape.append(
                        f"{key} -> {'/'.join(path)}: {candidate.shape} vs {target[path].shape}"
                    )
                converted[path] = candidate
                break
        else:
            unexpected.append(key)
    fresh = [re.compile(p) for p in spec.fresh]
    missing = [
        "/".join(path)
        for path in target
        if path not in converted and not any(p.fullmatch("/".join(path)) for p in fresh)
    ]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"checkpoint does not fit {name} ({spec.backbone}):"
            + _listing("keys in the checkpoint that match no variable", unexpected)
            + _listing("variables the checkpoint does not provide", missing)
            + _listing("shapes that differ (checkpoint vs model)", wrong_shape)
        )
    return traverse_util.unflatten_dict(converted)


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    return f"\n  {len(items)} {title}:\n    " + "\n    ".join(items)


def load_backbone(variables: dict, converted: dict, submodule: str = "backbone") -> dict:
    """Returns `variables` with the converted backbone weights under `submodule`.

    `variables` are a model's initial variables (e.g. a segmentor's); every converted
    array replaces the initial one of the same path and shape (fresh layers keep theirs).
    """
    flat = traverse_util.flatten_dict(variables)
    for path, value in traverse_util.flatten_dict(converted).items():
        collection, *rest = path
        full = (collection, submodule, *rest) if submodule else path
        if full not in flat:
            raise ValueError(f"pretrained variable {'/'.join(full)} is not in the model")
        if flat[full].shape != value.shape:
            raise ValueError(
                f"pretrained variable {'/'.join(full)} has shape {value.shape}, "
                f"the model expects {flat[full].shape}"
            )
        flat[full] = jnp.asarray(value, flat[full].dtype)
    return traverse_util.unflatten_dict(flat)


def save_variables(path: str, variables: dict) -> None:
    """Writes variables as an .npz of '/'-joined paths (atomically: temp file + rename)."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_variables(path: str) -> dict:
    """Reads variables written by `save_variables` (the CLI's output)."""
    with np.load(path) as data:
        return traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A timm checkpoint file as numpy arrays (.safetensors; .pth/.bin need torch)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install -r requirements-bench.txt), "
            "or use the checkpoint's .safetensors file"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # wrapped checkpoints
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`pne-jax convert --arch=... --checkpoint=... --out=...` (argv without the program)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Convert a timm checkpoint to pne-jax backbone variables."
    )
    parser.add_argument("--arch", required=True, choices=sorted(TIMM_ARCHS))
    parser.add_argument("--checkpoint", required=True, help=".safetensors, .pth or .bin")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    try:
        variables = convert_timm(args.arch, read_state_dict(args.checkpoint))
    except (FileNotFoundError, ImportError, ValueError) as e:  # each names what to fix
        raise SystemExit(f"error: {e}") from None
    save_variables(args.out, variables)
    count = sum(np.size(v) for v in jax.tree.leaves(variables))
    print(f"wrote {args.out}: {count / 1e6:.2f}M values for {TIMM_ARCHS[args.arch].backbone}")


if __name__ == "__main__":
    main()
