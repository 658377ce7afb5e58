"""Segmentation models of the paper; `build_backbone` and `build_model` are the one registry."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from pne_jax.models.backbones import resnet

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50_v1c": resnet.resnet50_v1c,
    "resnet101_v1c": resnet.resnet101_v1c,
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """A bare backbone by name, e.g. `build_backbone("resnet101_v1c", output_stride=8)`.

    Keyword arguments go to the module (`output_stride` for ResNet, `dtype` for all).
    """
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[name](**kwargs)


__all__ = ["BACKBONES", "build_backbone"]
