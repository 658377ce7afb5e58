"""Segmentation models of the paper; `build_backbone` and `build_model` are the one registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pne_jax.models.backbones import hrnet, resnet, swin
from pne_jax.models.heads import ASPPHead, FCNHead, OCRHead, ProjectionHead, UPerHead
from pne_jax.models.layers import BN_MOMENTUM
from pne_jax.models.segmentor import Segmentor, check_projection_feature

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50_v1c": resnet.resnet50_v1c,
    "resnet101_v1c": resnet.resnet101_v1c,
    "resnet_tiny_v1c": resnet.resnet_tiny_v1c,
    "hrnetv2_w18": hrnet.hrnetv2_w18,
    "hrnetv2_w48": hrnet.hrnetv2_w48,
    "swin_tiny": swin.swin_tiny,
    "swin_base": swin.swin_base,
}

# Channels of the four maps each backbone returns (strides 4, 8, 16, 32 undilated).
BACKBONE_CHANNELS: dict[str, tuple[int, ...]] = {
    "resnet50_v1c": (256, 512, 1024, 2048),
    "resnet101_v1c": (256, 512, 1024, 2048),
    "resnet_tiny_v1c": (64, 128, 256, 512),
    "hrnetv2_w18": (18, 36, 72, 144),
    "hrnetv2_w48": (48, 96, 192, 384),
    "swin_tiny": (96, 192, 384, 768),
    "swin_base": (128, 256, 512, 1024),
}

DECODE_HEADS = ("aspp", "fcn", "ocr", "uper")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

MODEL_KEYS = (
    "backbone",
    "output_stride",
    "drop_path_rate",
    "pretrained",
    "init_from",
    "decode_head",
    "num_classes",
    "channels",
    "dropout",
    "in_index",
    "aspp_dilations",
    "pool_scales",
    "ocr_channels",
    "fcn_num_convs",
    "fcn_kernel_size",
    "fcn_concat_input",
    "aux_head",
    "projection",
    "dtype",
)
AUX_KEYS = ("in_index", "channels", "num_convs", "kernel_size", "concat_input", "dropout")
PROJECTION_KEYS = ("enabled", "hidden", "out", "feature")


def _unknown(name: str, kind: str, known) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(known))}")


def build_backbone(name: str, **kwargs) -> nn.Module:
    """A bare backbone by name, e.g. `build_backbone("resnet101_v1c", output_stride=8)`.

    Keyword arguments go to the module (`output_stride` for ResNet, `drop_path_rate` for
    Swin, `dtype` for all).
    """
    if name not in BACKBONES:
        raise _unknown(name, "backbone", BACKBONES)
    return BACKBONES[name](**kwargs)


def _options(value: Any, keys: tuple[str, ...], what: str) -> tuple[bool, dict[str, Any]]:
    """A bool or a mapping (ConfigDict) -> (enabled, overrides); unknown keys raise."""
    if value is None or isinstance(value, bool):
        return bool(value), {}
    options = {k: v for k, v in value.items() if v is not None}
    for key in options:
        if key not in (*keys, "enabled"):
            raise _unknown(key, f"{what} option", keys)
    return bool(options.pop("enabled", True)), options


def _aux_head(cfg, hrnet_like: bool, channels: tuple[int, ...], dtype) -> nn.Module | None:
    """MMSegmentation's auxiliary FCN: on HRNetV2 the resize-concat FCN (OCRNet's first
    stage), elsewhere one 3x3 layer of 256 on stage 3."""
    default = cfg.decode_head != "fcn" or not hrnet_like
    enabled, options = _options(cfg.get("aux_head", default), AUX_KEYS, "aux_head")
    if cfg.decode_head == "ocr" and not enabled:
        raise ValueError("decode_head='ocr' is a cascade: its first stage is the aux_head")
    if not enabled:
        return None
    if hrnet_like:
        kwargs = dict(in_index=(0, 1, 2, 3), channels=sum(channels), num_convs=1, kernel_size=1)
        kwargs |= dict(concat_input=False, dropout=0.0)
    else:
        kwargs = dict(in_index=2, channels=256, num_convs=1, kernel_size=3)
        kwargs |= dict(concat_input=False, dropout=0.1)
    kwargs |= options
    if isinstance(kwargs["in_index"], list):
        kwargs["in_index"] = tuple(kwargs["in_index"])
    if cfg.decode_head == "ocr":  # MMSegmentation runs the cascade's first stage twice
        kwargs["bn_momentum"] = BN_MOMENTUM**2
    return FCNHead(cfg.num_classes, dtype=dtype, **kwargs)


def _decode_head(cfg, hrnet_like: bool, channels: tuple[int, ...], dtype) -> nn.Module:
    """The decode head with MMSegmentation's defaults for this head and backbone."""
    head = cfg.decode_head
    get = cfg.get
    in_index = get("in_index")
    in_index = tuple(in_index) if isinstance(in_index, (list, tuple)) else in_index
    all_maps = (0, 1, 2, 3)
    common = dict(num_classes=cfg.num_classes, dtype=dtype)
    if head == "aspp":
        dilations = get("aspp_dilations") or (
            (1, 12, 24, 36) if get("output_stride", 8) == 8 else (1, 6, 12, 18)
        )
        return ASPPHead(
            channels=get("channels") or 512,
            dilations=tuple(dilations),
            dropout=_or(get("dropout"), 0.1),
            in_index=_or(in_index, -1),
            **common,
        )
    if head == "fcn":
        return FCNHead(
            channels=get("channels") or (sum(channels) if hrnet_like else 512),
            num_convs=_or(get("fcn_num_convs"), 1 if hrnet_like else 2),
            kernel_size=_or(get("fcn_kernel_size"), 1 if hrnet_like else 3),
            concat_input=_or(get("fcn_concat_input"), not hrnet_like),
            dropout=_or(get("dropout"), 0.0 if hrnet_like else 0.1),
            in_index=_or(in_index, all_maps if hrnet_like else -1),
            **common,
        )
    if head == "ocr":
        return OCRHead(
            channels=get("channels") or 512,
            ocr_channels=get("ocr_channels") or 256,
            dropout=_or(get("dropout"), 0.0 if hrnet_like else 0.1),
            in_index=_or(in_index, all_maps if hrnet_like else -1),
            **common,
        )
    if head == "uper":
        return UPerHead(
            channels=get("channels") or 512,
            pool_scales=tuple(get("pool_scales") or (1, 2, 3, 6)),
            dropout=_or(get("dropout"), 0.1),
            in_index=_or(in_index, all_maps),
            **common,
        )
    raise _unknown(head, "decode head", DECODE_HEADS)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def build_model(config: Mapping[str, Any]) -> Segmentor:
    """A `Segmentor` from a model config (`config.model`, an `ml_collections.ConfigDict`).

    Required: `backbone` (a name in `BACKBONES`), `decode_head` ('aspp' | 'fcn' | 'ocr' |
    'uper'), `num_classes`. Everything else is optional, None or absent meaning
    MMSegmentation's default for that head on that backbone:

    - `output_stride` (ResNet: 8 | 16 | 32, default 8); `drop_path_rate` (Swin, default 0.3);
      `pretrained` (ImageNet backbone weights) and `init_from` (a whole trained model),
      files read by `pne_jax.pretrained` at start-up, ignored here;
    - `channels` (decode head width: 512; FCN on HRNetV2: the sum of branch widths),
      `dropout` (before the classifier: 0.1; HRNetV2 FCN/OCR: none), `in_index` (which
      backbone maps the head reads: an int, or a tuple to resize-concat);
    - `aspp_dilations` ((1, 12, 24, 36) at output stride 8, else (1, 6, 12, 18)),
      `pool_scales` (UPerNet PPM: (1, 2, 3, 6)), `ocr_channels` (256),
      `fcn_num_convs` / `fcn_kernel_size` / `fcn_concat_input` (HRNetV2: 1, 1, False;
      else 2, 3, True);
    - `aux_head`: bool, or a ConfigDict overriding `in_index`, `channels`, `num_convs`,
      `kernel_size`, `concat_input`, `dropout` of the auxiliary FCN (stage 3, 256 wide,
      one 3x3 layer, dropout 0.1; on HRNetV2 the resize-concat FCN). Default on, except
      for FCN on HRNetV2; required by 'ocr', whose first stage it is;
    - `projection`: bool, or a ConfigDict of `enabled` (True), `hidden` (512), `out`
      (256) and `feature` ('decode' (default) | 'aux' | 'backbone' | 'backbone:<i>');
    - `dtype`: compute dtype, 'float32' (default) | 'bfloat16'; params stay float32.

    The paper's models (`cfg = ml_collections.ConfigDict(dict(...))`):

        DeepLabV3-R101-D8, Cityscapes:  backbone="resnet101_v1c", output_stride=8,
                                        decode_head="aspp", num_classes=19
        DeepLabV3-R101-D8, ADE20K:      same with num_classes=150 (COCO-Stuff: 171)
        FCN-HRNetV2-W48, Cityscapes:    backbone="hrnetv2_w48", decode_head="fcn",
                                        num_classes=19
        OCRNet-HRNetV2-W48, Cityscapes: backbone="hrnetv2_w48", decode_head="ocr",
                                        num_classes=19
        UperNet-Swin-T, ADE20K:         backbone="swin_tiny", decode_head="uper",
                                        num_classes=150, drop_path_rate=0.3
        UperNet-Swin-B, ADE20K:         backbone="swin_base", decode_head="uper",
                                        num_classes=150, drop_path_rate=0.3

    Unknown names (backbone, head, dtype, keys) raise ValueError listing the known ones.
    """
    for key in config.keys():
        if key not in MODEL_KEYS:
            raise _unknown(key, "model config key", MODEL_KEYS)
    name = config["backbone"]
    if name not in BACKBONES:
        raise _unknown(name, "backbone", BACKBONES)
    if config["decode_head"] not in DECODE_HEADS:
        raise _unknown(config["decode_head"], "decode head", DECODE_HEADS)
    dtype_name = config.get("dtype") or "float32"
    if dtype_name not in DTYPES:
        raise _unknown(dtype_name, "dtype", DTYPES)
    dtype = DTYPES[dtype_name]

    backbone_kwargs: dict[str, Any] = {"dtype": dtype}
    for key, prefix in (("output_stride", "resnet"), ("drop_path_rate", "swin")):
        if config.get(key) is not None:
            if not name.startswith(prefix):
                raise ValueError(f"{key} applies to {prefix} backbones, not {name!r}")
            backbone_kwargs[key] = config[key]
    hrnet_like = name.startswith("hrnet")
    channels = BACKBONE_CHANNELS[name]

    cfg = _View(config)
    decode_head = _decode_head(cfg, hrnet_like, channels, dtype)
    aux_head = _aux_head(cfg, hrnet_like, channels, dtype)

    enabled, options = _options(cfg.get("projection", True), PROJECTION_KEYS, "projection")
    feature = options.pop("feature", "decode")
    check_projection_feature(feature)
    projection = ProjectionHead(**options, dtype=dtype) if enabled else None
    return Segmentor(
        backbone=BACKBONES[name](**backbone_kwargs),
        decode_head=decode_head,
        aux_head=aux_head,
        projection=projection,
        projection_feature=feature,
        cascade=config["decode_head"] == "ocr",
    )


class _View:
    """Attribute and `.get` access to a mapping (a ConfigDict or a plain dict)."""

    def __init__(self, mapping: Mapping[str, Any]):
        self._mapping = mapping

    def get(self, key: str, default: Any = None) -> Any:
        value = self._mapping.get(key, default)
        return default if value is None else value

    def __getattr__(self, key: str) -> Any:
        return self._mapping[key]


__all__ = ["BACKBONES", "BACKBONE_CHANNELS", "Segmentor", "build_backbone", "build_model"]
