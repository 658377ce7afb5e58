"""Helpers for the opt-in parity tests against timm (`make parity`).

timm imports torchvision, whose PyPI build does not load beside the CPU build of torch
pinned in requirements-bench.txt ("operator torchvision::nms does not exist"). timm's
models need none of torchvision's compiled operators: only data transforms and one
frozen-BN class are imported at module level. `import_timm` therefore installs a minimal
stand-in for those names when the real torchvision cannot be imported.
"""

from __future__ import annotations

import enum
import sys
import types

import numpy as np


def _install_torchvision_stand_in() -> None:
    import torch

    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__path__ = []
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is not installed; this stand-in only lets timm import")

    def placeholder(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Unavailable,), {})

    class FrozenBatchNorm2d(torch.nn.Module):
        pass

    functional = module("torchvision.transforms.functional", InterpolationMode=InterpolationMode)
    transforms = module(
        "torchvision.transforms", InterpolationMode=InterpolationMode, functional=functional
    )
    datasets = module("torchvision.datasets")
    for m in (functional, transforms, datasets):
        m.__getattr__ = placeholder
    misc = module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    ops = module("torchvision.ops", misc=misc)
    module("torchvision", transforms=transforms, datasets=datasets, ops=ops, __version__="stand-in")


def import_timm():
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        sys.modules.pop("torchvision", None)
        _install_torchvision_stand_in()
    import timm

    return timm


def randomize_norms(model, seed: int = 0) -> None:
    """Random BatchNorm/LayerNorm affine parameters and running statistics, so that a
    conversion that mixes them up cannot pass."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
