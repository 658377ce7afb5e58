"""MMSegmentation 1.2.2 for the opt-in parity tests (`make parity`), built from its configs.

mmcv-lite has no compiled `mmcv.ops`; the paper's models need none of them, but mmseg
imports some names at module level, so a placeholder module stands in (any use raises).
mmseg imports timm, which needs the torchvision stand-in of `timm_compat`.
"""

from __future__ import annotations

import os
import sys
import types

from tests.timm_compat import import_timm

# The paper's models: MMSegmentation's config file and our shipped config of that model.
PAPER_MODELS = {
    "deeplabv3_r101": (
        "deeplabv3/deeplabv3_r101-d8_4xb2-40k_cityscapes-512x1024.py",
        "cityscapes_deeplab",
    ),
    "fcn_hr48": ("hrnet/fcn_hr48_4xb2-40k_cityscapes-512x1024.py", "cityscapes_hrnet"),
    "ocrnet_hr48": ("ocrnet/ocrnet_hr48_4xb2-40k_cityscapes-512x1024.py", "cityscapes_ocrnet"),
    "upernet_swin_t": (
        "swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py",
        "ade20k_upernet_swin",
    ),
    "upernet_swin_b": (
        "swin/swin-base-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py",
        "ade20k_upernet_swin:base",
    ),
}


class _Unavailable(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is compiled; mmcv-lite does not have it")

        return type(name, (), {"__init__": unavailable}) if name[:1].isupper() else unavailable


def import_mmseg():
    """mmseg, with its modules registered (mmcv.ops stubbed, timm importable)."""
    import_timm()
    if "mmcv.ops" not in sys.modules:
        try:
            import mmcv.ops  # noqa: F401
        except (ImportError, ModuleNotFoundError):
            ops = _Unavailable("mmcv.ops")
            ops.__path__ = []
            sys.modules["mmcv.ops"] = ops
    import mmseg
    from mmseg.utils import register_all_modules

    register_all_modules()
    return mmseg


def _plain_bn(cfg):
    """SyncBN -> BN (one process), recursively."""
    if isinstance(cfg, dict):
        if cfg.get("type") == "SyncBN":
            cfg["type"] = "BN"
        for value in cfg.values():
            _plain_bn(value)
    elif isinstance(cfg, list):
        for value in cfg:
            _plain_bn(value)


def build(config_file: str):
    """The model of one of MMSegmentation's own config files, randomly initialised (no
    pretrained weights loaded), BatchNorm instead of SyncBN."""
    mmseg = import_mmseg()
    from mmengine import Config
    from mmseg.registry import MODELS

    path = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", config_file)
    model_cfg = Config.fromfile(path).model
    model_cfg.pop("data_preprocessor", None)
    model_cfg.pop("pretrained", None)
    model_cfg.backbone.pop("init_cfg", None)
    model_cfg.backbone.pop("pretrained", None)
    _plain_bn(model_cfg)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model


def state_dict_layouts(names=None) -> dict[str, list[tuple[str, list[int]]]]:
    """{model: [(key, shape), ...]} of MMSegmentation's state dicts for the paper models:
    what tests/data/mmseg_layouts.json.gz holds (`python -m tests.mmseg_compat` rewrites it)."""
    layouts = {}
    for name in names or PAPER_MODELS:
        model = build(PAPER_MODELS[name][0])
        layouts[name] = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    return layouts


LAYOUTS_FILE = os.path.join(os.path.dirname(__file__), "data", "mmseg_layouts.json.gz")
LAYOUT_MODELS = ("deeplabv3_r101", "fcn_hr48", "ocrnet_hr48", "upernet_swin_t")

if __name__ == "__main__":
    import gzip
    import json

    os.makedirs(os.path.dirname(LAYOUTS_FILE), exist_ok=True)
    with gzip.open(LAYOUTS_FILE, "wt") as f:
        json.dump(state_dict_layouts(LAYOUT_MODELS), f, separators=(",", ":"))
    print(f"wrote {LAYOUTS_FILE}")
