"""Weights from checkpoints the user downloaded: ImageNet backbones and whole models.

Nothing is fetched at run time. Download a checkpoint (`.safetensors`, or a `torch.save`
`.pth` / `.bin`, read without torch by `torch_pickle`), then either point the config at
it (`config.model.pretrained` for a backbone, `config.model.init_from` for a whole
MMSegmentation model: converted at start-up) or convert it once:

    pne-jax convert --arch=resnet101c --checkpoint=model.safetensors --out=r101.npz
    pne-jax convert --arch=resnet101_v1c --checkpoint=resnet101_v1c-e67eebb6.pth --out=r101.npz
    pne-jax convert --config=cityscapes_deeplab --checkpoint=deeplabv3_r101...pth --out=m.npz

timm's layouts are below; MMCV's, MMSegmentation's and the original Swin release's are
in `mmseg_weights`.

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
import logging
import os
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pne_jax.models import build_backbone
from pne_jax.models.backbones import hrnet, resnet, swin

Rename = tuple[str, str | Callable[[re.Match], str]]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's keys map onto one of our modules (a backbone or a head)."""

    backbone: str = ""  # name for build_backbone, where the module is a backbone
    renames: tuple[Rename, ...] = ()  # re.sub(pattern, repl) on the keys, in order
    ignore: tuple[str, ...] = ()  # keys (fullmatch) with no counterpart, e.g. classifiers
    fresh: tuple[str, ...] = ()  # our variable paths (fullmatch) that may be absent: keep init
    # (key pattern (fullmatch, before renames), value -> value in the checkpoint's layout)
    transforms: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = ()
    source: str = ""  # where the checkpoint comes from (README)


TIMM_ARCHS: dict[str, KeyMap] = {
    "resnet50c": KeyMap(
        "resnet50_v1c",
        resnet.TIMM_RENAMES,
        resnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/resnet50c.gluon_in1k",
    ),
    "resnet101c": KeyMap(
        "resnet101_v1c",
        resnet.TIMM_RENAMES,
        resnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/resnet101c.gluon_in1k",
    ),
    "hrnet_w18": KeyMap(
        "hrnetv2_w18",
        hrnet.TIMM_RENAMES,
        hrnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/hrnet_w18.ms_in1k",
    ),
    "hrnet_w48": KeyMap(
        "hrnetv2_w48",
        hrnet.TIMM_RENAMES,
        hrnet.TIMM_IGNORE,
        source="https://huggingface.co/timm/hrnet_w48.ms_in1k",
    ),
    "swin_tiny_patch4_window7_224": KeyMap(
        "swin_tiny",
        swin.TIMM_RENAMES,
        swin.TIMM_IGNORE,
        swin.TIMM_FRESH,
        source="https://huggingface.co/timm/swin_tiny_patch4_window7_224.ms_in1k",
    ),
    "swin_base_patch4_window12_384": KeyMap(
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
    model, state_dict: Mapping[str, np.ndarray], spec: KeyMap, name: str = "model"
) -> dict:
    """The conversion behind `convert_timm`, for any backbone module and rule table."""
    match = match_state_dict(_abstract_variables(model), state_dict, spec)
    match.raise_if_mismatched(f"{name} ({spec.backbone})" if spec.backbone else name)
    return traverse_util.unflatten_dict(match.converted)


@dataclasses.dataclass
class Match:
    """A state dict matched against a model's flat variables (`match_state_dict`)."""

    converted: dict  # flat variable path -> float32 array
    unexpected: list[str]  # checkpoint keys that match no variable
    missing: list[str]  # variables without a value (fresh ones excluded)
    wrong_shape: list[str]  # "key -> path: checkpoint shape vs model shape"
    fresh: list[str]  # variables left at their initial values, as the KeyMap allows

    def raise_if_mismatched(self, name: str, hint: str = "") -> None:
        """ValueError listing every problem at once, unless there is none."""
        if self.unexpected or self.missing or self.wrong_shape:
            raise ValueError(
                f"checkpoint does not fit {name}:"
                + (f" {hint}" if hint else "")
                + _listing("keys in the checkpoint that match no variable", self.unexpected)
                + _listing("variables the checkpoint does not provide", self.missing)
                + _listing("shapes that differ (checkpoint vs model)", self.wrong_shape)
            )


def match_state_dict(
    target: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
    state_dict: Mapping[str, np.ndarray],
    spec: KeyMap,
) -> Match:
    """Maps every checkpoint key onto a flat variable path of `target` by `spec`'s rules.

    A key is dropped if `spec.ignore` (or `num_batches_tracked`) matches it, transformed
    by the first matching `spec.transforms` entry, renamed by `spec.renames`, then
    placed by name and layout (`_candidates`). Nothing is dropped silently: the result
    lists unexpected keys, missing variables and shape mismatches.
    """
    ignore = [re.compile(p) for p in (*spec.ignore, *_ALWAYS_IGNORED)]
    transforms = [(re.compile(p), fn) for p, fn in spec.transforms]
    converted, unexpected, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in ignore):
            continue
        value = np.asarray(value, np.float32)
        for pattern, fn in transforms:
            if pattern.fullmatch(key):
                value = fn(value)
                break
        renamed = key
        for pattern, repl in spec.renames:
            renamed = re.sub(pattern, repl, renamed)
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
    fresh_patterns = [re.compile(p) for p in spec.fresh]
    missing, fresh = [], []
    for path in target:
        if path not in converted:
            joined = "/".join(path)
            (fresh if any(p.fullmatch(joined) for p in fresh_patterns) else missing).append(joined)
    return Match(converted, unexpected, missing, wrong_shape, fresh)


LISTED = 12  # items shown per kind of problem (the count says how many there are)


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    more = [f"... and {len(items) - LISTED} more"] if len(items) > LISTED else []
    return f"\n  {len(items)} {title}:\n    " + "\n    ".join(items[:LISTED] + more)


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
    """A checkpoint file's tensors by name, as NumPy arrays.

    `.safetensors`, or a `torch.save` file (`.pth`, `.pt`, `.bin`), read without torch by
    `torch_pickle` (torch is used only where that reader cannot, if installed). Wrapped
    checkpoints are unwrapped: MMSegmentation/MMCV's `state_dict`, the original Swin
    release's `model`, and DataParallel's `module.` prefix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".npz"):
        raise ValueError(
            f"{path} is an .npz: already converted variables, not a checkpoint to convert; "
            "pass it where converted variables go (config.model.pretrained / init_from)"
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    from pne_jax import torch_pickle

    try:
        state = torch_pickle.load(path)
    except torch_pickle.UnsupportedCheckpoint as e:
        state = _torch_load_or_raise(path, e)
    for key in ("state_dict", "model"):  # wrapped checkpoints
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"{path} is not a state dict: {key!r} holds a {type(value).__name__}, not a tensor"
            )
        arrays[key[len("module.") :] if key.startswith("module.") else key] = value
    return arrays


def _torch_load_or_raise(path: str, error: Exception):
    """torch.load(weights_only=True) where torch is installed and reads what our reader
    would not; else the reader's error (which says what is wrong with the file)."""
    try:
        import torch
    except ImportError:
        if "does not rebuild" in str(error) or "not supported" in str(error):  # torch can
            raise ValueError(
                f"{error}. torch reads such tensors: install it (a CPU build, "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu) and "
                "run again"
            ) from None
        raise error from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as torch_error:
        raise error from torch_error

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.float().numpy() if x.is_floating_point() else x.numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        return x

    return to_numpy(state)


def backbone_variables(path: str, backbone: str) -> dict:
    """ImageNet backbone variables for `build_backbone(backbone)` from `path`: an .npz
    written by `pne-jax convert`, or a checkpoint converted now (timm's, MMCV's /
    MMSegmentation's or the original Swin release's layout: `mmseg_weights`)."""
    if path.endswith(".npz"):
        return load_variables(path)
    from pne_jax import mmseg_weights

    keymap = mmseg_weights.backbone_keymap(backbone)
    state = mmseg_weights.prepare_backbone(backbone, read_state_dict(path))
    match = match_state_dict(_abstract_variables(build_backbone(backbone)), state, keymap)
    match.raise_if_mismatched(f"backbone {backbone} ({path})", hint=_model_hint(state))
    if match.fresh:
        logging.info("%s: %d variables newly initialised: %s", path, len(match.fresh), match.fresh)
    return traverse_util.unflatten_dict(match.converted)


def _model_hint(state: Mapping[str, np.ndarray]) -> str:
    if any(k.startswith(("backbone.", "decode_head.")) for k in state):
        return (
            "it is a whole segmentation model: pass it as config.model.init_from, or convert "
            "it with pne-jax convert --config=..."
        )
    return ""


def model_variables(path: str, model_config) -> dict:
    """A whole model's variables {"params", "batch_stats"} for `build_model(model_config)`
    from `path`: an .npz written by `pne-jax convert --config=...`, or an MMSegmentation
    model checkpoint converted now. Variables the file lacks (the PNE projection head of
    an MMSegmentation model) are left out and logged: `merge_variables` keeps their
    initial values."""
    if path.endswith(".npz"):
        return load_variables(path)
    from pne_jax import mmseg_weights

    variables, fresh = mmseg_weights.convert_model(model_config, read_state_dict(path))
    if fresh:
        logging.info(
            "%s has no PNE projection head: %d variables newly initialised", path, len(fresh)
        )
    return variables


def merge_variables(variables: dict, loaded: dict) -> dict:
    """`variables` with every array of `loaded` (same paths, same shapes) in place."""
    return load_backbone(variables, loaded, submodule="")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`pne-jax convert` (argv without the program): a backbone (`--arch`) or a whole
    MMSegmentation model (`--config`) into an .npz of our variables."""
    import argparse

    from pne_jax.models import BACKBONES

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a checkpoint (timm, MMCV/MMSegmentation, original Swin) to "
        "pne-jax variables.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--arch",
        choices=sorted({*TIMM_ARCHS, *BACKBONES} - {"resnet_tiny_v1c"}),
        help="an ImageNet backbone: a timm name, or ours (any supported layout)",
    )
    what.add_argument(
        "--config",
        help="a whole MMSegmentation model, for this config's model (a shipped config "
        "name[:arg] or a .py path); its num_classes must be the checkpoint's",
    )
    parser.add_argument("--checkpoint", required=True, help=".pth, .pt, .bin or .safetensors")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    try:
        if args.config:
            from pne_jax import configs

            config = configs.get_config(args.config)
            variables = model_variables(args.checkpoint, config.model)
            what = f"{config.model.backbone} + {config.model.decode_head}"
        elif args.arch in TIMM_ARCHS:
            variables = convert_timm(args.arch, read_state_dict(args.checkpoint))
            what = TIMM_ARCHS[args.arch].backbone
        else:
            variables = backbone_variables(args.checkpoint, args.arch)
            what = args.arch
    except (FileNotFoundError, ImportError, ValueError) as e:  # each names what to fix
        raise SystemExit(f"error: {e}") from None
    save_variables(args.out, variables)
    count = sum(np.size(v) for v in jax.tree.leaves(variables))
    print(f"wrote {args.out}: {count / 1e6:.2f}M values for {what}")


if __name__ == "__main__":
    main()
