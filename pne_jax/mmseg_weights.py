"""MMSegmentation's and MMCV's checkpoint layouts: their keys onto our variables.

Two kinds of files, both read by `pretrained.read_state_dict` (no torch needed):

- ImageNet backbones as MMSegmentation loads them: MMCV's `open-mmlab://resnet50_v1c` /
  `resnet101_v1c` (deep stem under `stem.{0,1,3,4,6,7}`), `open-mmlab://msra/hrnetv2_w18`
  / `hrnetv2_w48` (HRNet-classification's names, which timm kept), and Swin as the
  original Microsoft release (`layers.i.downsample` closing stage i; timm's opens stage
  i + 1) or as MMSegmentation's converted files (`stages`, `w_msa`, `ffn.layers`,
  `patch_embed.projection`, PatchMerging weights in `nn.Unfold`'s channel order).
  `backbone_keymap` accepts each of these and timm's layout for the same backbone.
- Whole trained models of MMSegmentation's model zoo, 0.x and 1.x (`backbone.*`,
  `decode_head.*`, `auxiliary_head.*`; OCRNet's cascade as `decode_head.0.*` (its FCN
  stage, our `aux_head`) and `decode_head.1.*`): `convert_model`. The PNE projection
  head, which MMSegmentation's models lack, keeps its initial values and is reported.

Our module names follow timm's; the tables below rename MMSegmentation's keys onto
them, and `pretrained.match_state_dict` does the rest (layouts, checks).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from pne_jax import pretrained
from pne_jax.models import build_model
from pne_jax.models.backbones import hrnet, resnet, swin

# --- backbones ---------------------------------------------------------------------------

# MMCV's ResNetV1c stem: Sequential(conv, BN, ReLU, conv, BN, ReLU, conv, BN, ReLU).
_MMCV_RESNET_RENAMES = ((r"^stem\.7\.", "bn1."), (r"^stem\.(\d)\.", r"conv1.\1."))


def _unfold_to_timm(x: np.ndarray) -> np.ndarray:
    """PatchMerging's 4C input channels from `nn.Unfold` order (c * 4 + k, k over the 2x2
    window column-major) to timm's (k * C + c, k in (0,0), (1,0), (0,1), (1,1)).

    Works on the reduction weight [out, 4C] (last axis) and the norm's [4C] vectors.
    """
    *lead, four_c = x.shape
    c = four_c // 4
    x = x.reshape(*lead, c, 4)[..., [0, 2, 1, 3]]  # unfold's k: (0,0), (0,1), (1,0), (1,1)
    return np.swapaxes(x, -1, -2).reshape(*lead, four_c)


_MMSEG_SWIN_RENAMES: tuple[pretrained.Rename, ...] = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^stages\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (r"^stages\.", "layers."),
    (r"\.attn\.w_msa\.", ".attn."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
)
_MMSEG_SWIN_TRANSFORMS = (
    (r"stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", _unfold_to_timm),
)


def _shift_original_swin(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The original release closes stage i with its PatchMerging; timm and we open stage
    i + 1 with it. Other layouts pass through."""
    if "layers.0.downsample.reduction.weight" not in state_dict:
        return dict(state_dict)
    shift = re.compile(r"^layers\.(\d+)\.downsample\.")
    return {
        shift.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample.", k): v
        for k, v in state_dict.items()
    }


def _family(backbone: str) -> str:
    for family in ("resnet", "hrnet", "swin"):
        if backbone.startswith(family):
            return family
    raise ValueError(f"no checkpoint layouts known for backbone {backbone!r}")


def backbone_keymap(backbone: str) -> pretrained.KeyMap:
    """The rules for an ImageNet checkpoint of `backbone` (one of `models.BACKBONES`) in
    timm's, MMCV's / MMSegmentation's or (Swin) the original release's layout: the
    layouts' keys do not collide, so one table serves all (after `prepare_backbone`)."""
    family = _family(backbone)
    if family == "resnet":
        return pretrained.KeyMap(backbone, _MMCV_RESNET_RENAMES, resnet.TIMM_IGNORE)
    if family == "hrnet":
        return pretrained.KeyMap(backbone, hrnet.TIMM_RENAMES, hrnet.TIMM_IGNORE)
    return pretrained.KeyMap(
        backbone,
        _MMSEG_SWIN_RENAMES,
        swin.TIMM_IGNORE,
        swin.TIMM_FRESH,
        _MMSEG_SWIN_TRANSFORMS,
    )


def prepare_backbone(backbone: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Layout fixes that renames cannot express (the original Swin's stage shift)."""
    if _family(backbone) == "swin":
        return _shift_original_swin(state_dict)
    return dict(state_dict)


# --- whole models ------------------------------------------------------------------------

_CONV_SEG = (r"^conv_seg\.", "cls.conv_seg.")
HEAD_RENAMES: dict[str, tuple[pretrained.Rename, ...]] = {
    "aspp": ((r"^image_pool\.1\.", "image_pool.conv."), (r"^aspp_modules\.", "aspp."), _CONV_SEG),
    "fcn": (_CONV_SEG,),
    "ocr": (
        (r"^object_context_block\.", "object_context."),
        (r"^object_context\.(query|key)_project\.(\d+)\.", r"object_context.\1_project.layers.\2."),
        (
            r"^object_context\.(value|out)_project\.(conv|bn)\.",
            r"object_context.\1_project.layers.0.\2.",
        ),
        _CONV_SEG,
    ),
    "uper": (
        (r"^psp_modules\.(\d+)\.1\.", r"ppm.psp.\1."),
        (r"^bottleneck\.", "ppm.bottleneck."),
        (r"^lateral_convs\.", "lateral."),
        (r"^fpn_convs\.", "fpn."),
        _CONV_SEG,
    ),
}
# Buffers of MMSegmentation models with no counterpart (computed here, or not weights).
_MODEL_IGNORE = (r"data_preprocessor\..*", r".*relative_position_index", r".*attn_mask")


def _parts(model_config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """MMSegmentation's key prefix -> (our submodule, head kind) for this model."""
    head = model_config["decode_head"]
    if head == "ocr":  # CascadeEncoderDecoder: decode_head is a list of two heads
        return {"decode_head.0.": ("aux_head", "fcn"), "decode_head.1.": ("decode_head", "ocr")}
    return {"decode_head.": ("decode_head", head), "auxiliary_head.": ("aux_head", "fcn")}


def describe(state_dict: Mapping[str, Any]) -> str:
    """What architecture an MMSegmentation state dict looks like, e.g. 'backbone=
    resnet101_v1c, decode_head=aspp, num_classes=19' (for error messages)."""
    keys = set(state_dict)
    found = []
    if "backbone.stem.0.weight" in keys or "backbone.conv1.0.weight" in keys:
        blocks = {k.split(".")[2] for k in keys if k.startswith("backbone.layer3.")}
        found.append(f"backbone=resnet{ {6: 50, 23: 101}.get(len(blocks), '?') }_v1c")
    elif "backbone.transition1.0.0.weight" in keys:
        found.append(
            f"backbone=hrnetv2_w{np.shape(state_dict['backbone.transition1.0.0.weight'])[0]}"
        )
    elif "backbone.patch_embed.projection.weight" in keys:
        dim = np.shape(state_dict["backbone.patch_embed.projection.weight"])[0]
        found.append(f"backbone=swin ({dim} channels: {'base' if dim == 128 else 'tiny/small'})")
    heads = {
        "aspp_modules": "aspp",
        "object_context_block": "ocr",
        "psp_modules": "uper" if any(".lateral_convs." in k for k in keys) else "psp",
    }
    for marker, head in heads.items():
        if any(f".{marker}." in k for k in keys):
            found.append(f"decode_head={head}")
            break
    else:
        if any(k.startswith("decode_head.convs.") for k in keys):
            found.append("decode_head=fcn")
    for key in ("decode_head.conv_seg.weight", "decode_head.1.conv_seg.weight"):
        if key in keys:
            found.append(f"num_classes={np.shape(state_dict[key])[0]}")
    return ", ".join(found) or "no MMSegmentation model"


def convert_model(
    model_config: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> tuple[dict, list[str]]:
    """An MMSegmentation model's state dict -> (our full variables, fresh variable paths).

    `model_config` is `config.model` (its backbone, heads and `num_classes` must be the
    checkpoint's). Every key must find its variable and every variable but the PNE
    projection head's its key, with equal shapes; else ValueError naming the keys, what
    the checkpoint looks like and, for another class count, the setting to change.
    """
    model = build_model(model_config)
    target = pretrained._abstract_variables(model)
    backbone = model_config["backbone"]
    parts = {"backbone.": ("backbone", None), **_parts(model_config)}
    converted: dict = {}
    unexpected: list[str] = []
    missing: list[str] = []
    wrong_shape: list[str] = []
    fresh: list[str] = []
    routed: dict[str, dict[str, Any]] = {prefix: {} for prefix in parts}
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            if not any(re.fullmatch(p, key) for p in _MODEL_IGNORE):
                unexpected.append(key)
            continue
        routed[prefix][key[len(prefix) :]] = value
    for prefix, (submodule, head) in parts.items():
        sub_target = {
            (path[0], *path[2:]): shape
            for path, shape in target.items()
            if len(path) > 1 and path[1] == submodule
        }
        if not sub_target:  # our model has no such part: its keys are unexpected
            unexpected += [prefix + k for k in routed[prefix]]
            continue
        if head is None:
            # A whole model has every backbone variable: none may stay fresh.
            spec = dataclasses.replace(backbone_keymap(backbone), fresh=())
            sub_state = prepare_backbone(backbone, routed[prefix])
        else:
            spec = pretrained.KeyMap(renames=HEAD_RENAMES[head], ignore=_MODEL_IGNORE)
            sub_state = routed[prefix]
        match = pretrained.match_state_dict(sub_target, sub_state, spec)
        for path, value in match.converted.items():
            converted[(path[0], submodule, *path[1:])] = value

        def ours(joined: str, submodule: str = submodule) -> str:
            collection, _, rest = joined.partition("/")
            return f"{collection}/{submodule}/{rest}"

        unexpected += [prefix + k for k in match.unexpected]
        missing += [ours(p) for p in match.missing]
        wrong_shape += [prefix + w for w in match.wrong_shape]
    for path in target:
        if len(path) > 1 and path[1] not in {s for s, _ in parts.values()}:
            fresh.append("/".join(path))  # the projection head
    result = pretrained.Match(converted, unexpected, missing, wrong_shape, fresh)
    name = (
        f"backbone={backbone}, decode_head={model_config['decode_head']}, "
        f"num_classes={model_config['num_classes']}"
    )
    result.raise_if_mismatched(name, hint=_hint(state_dict, model_config, result))
    return traverse_util.unflatten_dict(converted), fresh


def _hint(state_dict: Mapping[str, Any], model_config: Mapping[str, Any], match) -> str:
    if not (match.unexpected or match.missing or match.wrong_shape):
        return ""
    looks = describe(state_dict)
    hint = f"the checkpoint looks like {looks}."
    classes = re.search(r"num_classes=(\d+)", looks)
    if classes and int(classes[1]) != int(model_config["num_classes"]):
        hint += (
            f" It has {classes[1]} classes, the config {model_config['num_classes']}: use a "
            f"checkpoint of this dataset, or --config.model.num_classes={classes[1]}."
        )
    return hint
