"""Load the official PyTorch PNE loss from a checkout the user made, without MMSegmentation.

The official implementation (`jingw193/PNE_Loss`, class `ReverseContrastiveLoss` in
`mmseg/models/losses/reverse_contrastive_loss.py`) imports mmcv, mmseg, ipdb and
torchvision and hard-codes `torch.cuda` tensor types. This module stubs those imports
with minimal stand-ins so the file loads on its own, and offers `official_pne_loss`,
which takes our channels-last NumPy inputs. Nothing of the official code is stored in
this repository: pass the path of your own clone (`git clone
https://github.com/jingw193/PNE_Loss`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

LOSS_FILE = os.path.join("mmseg", "models", "losses", "reverse_contrastive_loss.py")
_PACKAGE = "_pne_official"


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # importable as a package
    sys.modules[name] = module
    return module


class _Registry:
    def register_module(self, *args, **kwargs):
        return (lambda cls: cls) if not args else args[0]


def load_official_class(repo: str):
    """Returns the official `ReverseContrastiveLoss` class from the checkout at `repo`."""
    path = os.path.join(repo, LOSS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: pass the root of a clone of https://github.com/jingw193/PNE_Loss"
        )
    import torch  # noqa: F401  (the official file needs the real torch)

    for name in ("mmcv", "ipdb", "torchvision", "mmseg"):
        if name not in sys.modules or not hasattr(sys.modules[name], "__file__"):
            _stub(name)
    sys.modules["mmcv"].utils = _stub("mmcv.utils", print_log=print)
    sys.modules["torchvision"].transforms = _stub("torchvision.transforms")
    sys.modules["mmseg"].utils = _stub("mmseg.utils", get_root_logger=lambda *a, **k: None)
    _stub(_PACKAGE)
    _stub(f"{_PACKAGE}.models")
    _stub(f"{_PACKAGE}.models.builder", LOSSES=_Registry())
    _stub(f"{_PACKAGE}.models.losses")
    _stub(f"{_PACKAGE}.models.losses.utils", weight_reduce_loss=None)
    name = f"{_PACKAGE}.models.losses.reverse_contrastive_loss"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.ReverseContrastiveLoss


@contextlib.contextmanager
def _cuda_types_on(device):
    """The official forward casts with torch.cuda.*Tensor; on CPU use the CPU types."""
    import torch

    if device.type == "cuda":
        yield
        return
    saved = torch.cuda.FloatTensor, torch.cuda.LongTensor
    torch.cuda.FloatTensor, torch.cuda.LongTensor = torch.FloatTensor, torch.LongTensor
    try:
        yield
    finally:
        torch.cuda.FloatTensor, torch.cuda.LongTensor = saved


def make_official_loss(
    repo: str, *, num_samples=100, temperature=1.0, loss_weight=1.3, gate=(0, 199)
):
    """An instance of the official loss configured as the paper's Cityscapes run."""
    cls = load_official_class(repo)
    return cls(
        loss_weight=loss_weight,
        temp=temperature,
        patch_size=num_samples,
        cal_function="EQUAL",
        cal_gate=list(gate),
        posweight=True,
    )


def official_pne_loss(loss, logits, labels, embeddings, *, device="cpu", requires_grad=False):
    """Runs the official loss on channels-last inputs.

    logits [B, h, w, C], labels [B, h, w] (already at the logits' resolution, so the
    official nearest resize is the identity), embeddings [B, h, w, D]. Returns
    (loss tensor, embeddings tensor [B, D, h, w]).
    """
    import torch

    device = torch.device(device)
    cls_score = torch.as_tensor(logits, device=device).permute(0, 3, 1, 2).contiguous()
    label = torch.as_tensor(labels, device=device).long()[:, None]
    emb = torch.as_tensor(embeddings, device=device).permute(0, 3, 1, 2).contiguous()
    emb.requires_grad_(requires_grad)
    with _cuda_types_on(device):
        value = loss(cls_score, label, con_seg_logit=emb)
    return value, emb
