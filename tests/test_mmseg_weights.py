"""MMSegmentation / MMCV checkpoint layouts onto our models, without torch or mmseg.

`tests/data/mmseg_layouts.json.gz` holds the keys and shapes of MMSegmentation 1.2.2's
state dicts of the paper models, as its own config files build them (written by
`python -m tests.mmseg_compat`; `test_layouts_file_is_mmsegmentations` checks it, opt-in).
A state dict of that layout with a distinct value pattern per tensor must land, every
value, where the PyTorch layout says: conv OIHW -> HWIO, linear [out, in] -> [in, out],
BatchNorm statistics into batch_stats, Swin's PatchMerging channels from `nn.Unfold`'s
order into timm's. The logits themselves are compared with MMSegmentation in
tests/test_mmseg_parity.py (`make parity`).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from flax import traverse_util

from pne_jax import configs, mmseg_weights, pretrained
from tests.mmseg_compat import LAYOUT_MODELS, LAYOUTS_FILE, PAPER_MODELS

with gzip.open(LAYOUTS_FILE, "rt") as _f:
    LAYOUTS = json.load(_f)


def _model_config(name: str):
    return configs.get_config(PAPER_MODELS[name][1]).model


def _tagged(layout) -> dict[str, np.ndarray]:
    """Tensor i holds i + (0..996) / 2000 in row-major order: which tensor a value came
    from, and where in it, can be read back."""
    return {
        key: (i + (np.arange(np.prod(shape), dtype=np.float32) % 997) / 2000).reshape(shape)
        for i, (key, shape) in enumerate(layout)
    }


def _unfold_positions(four_c: int) -> np.ndarray:
    """timm's PatchMerging channel k * C + c is nn.Unfold's c * 4 + kh * 2 + kw, where
    timm's k runs over (kh, kw) = (0, 0), (1, 0), (0, 1), (1, 1): k = kw * 2 + kh."""
    c = four_c // 4
    k, channel = np.divmod(np.arange(four_c), c)
    return channel * 4 + (k % 2) * 2 + k // 2


def _unfold_to_timm(x: np.ndarray) -> np.ndarray:
    return x[..., _unfold_positions(x.shape[-1])]


def _expected(key: str, value: np.ndarray) -> np.ndarray:
    if ".downsample.reduction." in key or ".downsample.norm." in key:
        value = _unfold_to_timm(value)
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and not key.endswith("relative_position_bias_table"):
        return value.T
    return value


@pytest.mark.parametrize("name", LAYOUT_MODELS)
def test_every_value_lands_in_its_place(name):
    layout = LAYOUTS[name]
    state = _tagged(layout)
    variables, fresh = mmseg_weights.convert_model(_model_config(name), state)
    flat = traverse_util.flatten_dict(variables)
    keys = [k for k, _ in layout]
    used = set()
    for path, value in flat.items():
        source = int(np.floor(value.ravel()[0]))
        key = keys[source]
        assert source not in used, f"{key} went to two variables"
        used.add(source)
        np.testing.assert_array_equal(value, _expected(key, state[key]), err_msg=f"{key} {path}")
        leaf = "running_var" if path[-1] == "var" else "running_mean" if path[-1] == "mean" else ""
        assert key.endswith(leaf)
    dropped = {keys[i] for i in set(range(len(keys))) - used}
    assert all(k.endswith(("num_batches_tracked", "relative_position_index")) for k in dropped), (
        sorted(dropped)[:5]
    )
    assert fresh and all(f.split("/")[1] == "projection" for f in fresh)


def _zeros(layout) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in layout}


def test_another_class_count_is_named():
    state = _zeros(LAYOUTS["deeplabv3_r101"])  # Cityscapes: 19 classes
    config = _model_config("deeplabv3_r101")
    config.num_classes = 150
    with pytest.raises(ValueError, match=r"It has 19 classes, the config 150") as e:
        mmseg_weights.convert_model(config, state)
    assert "decode_head.conv_seg.weight" in str(e.value)
    assert "backbone=resnet101_v1c, decode_head=aspp, num_classes=19" in str(e.value)


def test_missing_and_extra_keys_are_named():
    state = _zeros(LAYOUTS["ocrnet_hr48"])
    del state["decode_head.1.object_context_block.bottleneck.conv.weight"]
    state["decode_head.1.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        mmseg_weights.convert_model(_model_config("ocrnet_hr48"), state)
    message = str(e.value)
    assert "1 keys in the checkpoint that match no variable:\n    decode_head.1.extra.weight" in (
        message
    )
    assert "params/decode_head/object_context/bottleneck/conv/kernel" in message


def test_another_architecture_says_what_it_looks_like():
    state = _zeros(LAYOUTS["upernet_swin_t"])
    with pytest.raises(ValueError, match=r"looks like backbone=swin .*decode_head=uper"):
        mmseg_weights.convert_model(_model_config("deeplabv3_r101"), state)


def test_model_checkpoint_given_as_backbone_says_so(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in _zeros(LAYOUTS["fcn_hr48"]).items()}, path)
    with pytest.raises(ValueError, match="whole segmentation model: pass it as"):
        pretrained.backbone_variables(path, "hrnetv2_w48")


def _our_backbone(name: str) -> dict[tuple[str, ...], np.ndarray]:
    """Tagged values for every variable of our backbone `name` (flat paths)."""
    import jax
    import jax.numpy as jnp

    from pne_jax.models import build_backbone

    shapes = jax.eval_shape(
        lambda: build_backbone(name).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    )
    flat = traverse_util.flatten_dict(shapes)
    return {
        path: (i + (np.arange(np.prod(s.shape), dtype=np.float32) % 997) / 2000).reshape(s.shape)
        for i, (path, s) in enumerate(sorted(flat.items()))
    }


def _torch_value(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    """Our (path, value) -> (PyTorch leaf name, PyTorch layout), e.g. kernel -> weight."""
    leaf = path[-1]
    if leaf == "kernel":
        return "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf), value


def _timm_to_unfold(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[..., _unfold_positions(x.shape[-1])] = x
    return out


def _swin_key(module: list[str], layout: str) -> str:
    """Our module path (`layers_1/downsample/reduction`) in one of Swin's layouts."""
    parts = []
    for token in module:
        name, _, index = token.rpartition("_")
        parts += [name, index] if index.isdigit() and name else [token]
    key = ".".join(parts)
    if layout == "timm":
        return key
    stage = lambda m, shift: f"{m[1]}{int(m[2]) + shift}."  # noqa: E731
    import re

    key = re.sub(r"^(layers\.)(\d+)\.downsample\.", lambda m: stage(m, -1) + "downsample.", key)
    if layout == "original":
        return key
    key = key.replace("patch_embed.proj.", "patch_embed.projection.")
    key = re.sub(r"^layers\.", "stages.", key)
    key = key.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
    return key.replace(".mlp.fc2.", ".ffn.layers.1.")


@pytest.mark.parametrize("layout", ["timm", "original", "mmseg"])
def test_swin_imagenet_layouts(tmp_path, layout):
    """timm's, the original release's (PatchMerging closes a stage) and MMSegmentation's
    converted Swin checkpoints all give the same variables; the per-stage output norms,
    which none has, start fresh."""
    from safetensors.numpy import save_file

    ours = _our_backbone("swin_tiny")
    state = {}
    for path, value in ours.items():
        if path[1].startswith("norm") and path[1][4:].isdigit():
            continue  # norm0..norm3: not in ImageNet checkpoints
        leaf, value = _torch_value(path, value)
        key = f"{_swin_key(list(path[1:-1]), layout)}.{leaf}"
        if layout == "mmseg" and ".downsample." in key:
            value = _timm_to_unfold(value)
        state[key] = np.ascontiguousarray(value)
    state["head.weight"] = np.zeros((1000, 768), np.float32)  # classifier: ignored
    file = str(tmp_path / f"{layout}.safetensors")
    save_file(state, file)
    got = traverse_util.flatten_dict(pretrained.backbone_variables(file, "swin_tiny"))
    want = {p: v for p, v in ours.items() if not p[1][4:].isdigit() or not p[1].startswith("norm")}
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))


def test_mmcv_resnet_layout_equals_timm(tmp_path):
    """open-mmlab://resnet50_v1c's deep stem is `stem.{0,1,3,4,6,7}`; timm's `conv1.*`,
    `bn1`: the same weights either way."""
    from safetensors.numpy import save_file

    from tests.test_pretrained import timm_resnet50c_state_dict

    timm_state = timm_resnet50c_state_dict()
    stem = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4"}
    stem |= {"conv1.6": "stem.6", "bn1": "stem.7"}
    mmcv_state = {}
    for key, value in timm_state.items():
        module, _, leaf = key.rpartition(".")
        mmcv_state[f"{stem.get(module, module)}.{leaf}"] = np.asarray(value)
    assert "stem.7.running_var" in mmcv_state
    file = str(tmp_path / "resnet50_v1c.safetensors")
    save_file(mmcv_state, file)
    got = traverse_util.flatten_dict(pretrained.backbone_variables(file, "resnet50_v1c"))
    want = traverse_util.flatten_dict(pretrained.convert_timm("resnet50c", timm_state))
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value)


def test_init_from_is_evaluated_without_a_checkpoint(tmp_path):
    """`eval` on a workdir without checkpoints uses `model.init_from` (a whole model's
    weights, here an .npz from `pne-jax convert --config`); with `pretrained` also set,
    it says to choose one."""
    import jax

    from pne_jax import train
    from pne_jax.configs import demo
    from pne_jax.models import build_model

    config = demo.get_config()
    config.data.crop_size = (64, 64)
    model = build_model(config.model)
    image = np.zeros((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(5), image, train=False))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    file = str(tmp_path / "model.npz")
    pretrained.save_variables(file, weights)
    config.model.init_from = file
    variables, step = train.load_variables(config, str(tmp_path / "run"))
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), weights)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):  # a step was asked for
        train.load_variables(config, str(tmp_path / "run"), step=3)
    config.model.pretrained = file
    with pytest.raises(ValueError, match="set one of model.pretrained"):
        train.load_variables(config, str(tmp_path / "run"))


def test_read_state_dict_of_a_zoo_style_pth_without_torch(tmp_path, monkeypatch):
    """An MMSegmentation-style `.pth` ({'meta': ..., 'state_dict': ...}, DataParallel's
    `module.` prefix, an mmengine object in meta) reads without torch; a tensor kind only
    torch rebuilds says to install it; a damaged file says so."""
    from tests.test_torch_pickle import Call, tensor, write_legacy, write_zip

    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch fails
    weights = {"module.backbone.conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)}
    meta = {"mmseg_version": "0.13.0", "hub": Call("mmengine.logging", "MessageHub", 1)}
    for write in (write_zip, write_legacy):
        path = write(
            tmp_path / f"{write.__name__}.pth",
            {
                "meta": meta,
                "state_dict": {k: tensor(v) for k, v in weights.items()},
            },
        )
        state = pretrained.read_state_dict(str(path))
        assert list(state) == ["backbone.conv1.weight"]
        np.testing.assert_array_equal(
            state["backbone.conv1.weight"], weights["module.backbone.conv1.weight"]
        )
    quantized = write_zip(tmp_path / "q.pth", {"w": Call("torch._utils", "_rebuild_qtensor", 1)})
    with pytest.raises(ValueError, match="torch reads such tensors: install it"):
        pretrained.read_state_dict(str(quantized))
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes((tmp_path / "write_zip.pth").read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or damaged"):
        pretrained.read_state_dict(str(damaged))
