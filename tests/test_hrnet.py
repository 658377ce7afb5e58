"""HRNetV2 backbone: shapes, parameter counts, size check, bf16, and parity with timm.

The default tests neither import torch nor timm. The parity tests (`-m parity`) convert a
randomly initialised timm `hrnet_w18`/`hrnet_w48` (random BatchNorm statistics too) and
compare the four stage-4 branch outputs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pne_jax.models.backbones import hrnet

WIDTHS = {"hrnetv2_w18": (hrnet.hrnetv2_w18, 18), "hrnetv2_w48": (hrnet.hrnetv2_w48, 48)}

# Measured from timm 1.0.31: `timm.create_model(name, features_only=True,
# feature_location='')` (the backbone without the classification head), summing
# `p.numel()` over `parameters()` (params) and over the `running_mean`/`running_var`
# buffers of `state_dict()` (batch_stats).
PARAM_COUNTS = {
    "hrnetv2_w18": {"params": 9_562_260, "batch_stats": 33_936},  # timm hrnet_w18
    "hrnetv2_w48": {"params": 65_325_120, "batch_stats": 84_096},  # timm hrnet_w48
}

# bf16 vs f32 on W18 (1x64x96, eval mode, `_random_variables`): the measured max
# |bf16 - f32| relative to each output's max |f32| was 0.010-0.017 over seeds 0-2 (bf16
# keeps 8 mantissa bits, ~0.4% per rounding, compounded over ~100 conv/BN layers); the
# bound leaves ~2.5x headroom. (Train mode on a batch of 2 differs far more, 15-35%: batch
# statistics over a few pixels make a random network chaotic, amplifying any rounding.)
BF16_RTOL = 4e-2


@functools.cache
def _abstract_variables(name: str, dtype=jnp.float32) -> dict:
    """Variable shapes without computing anything (cached: tracing W48 takes seconds)."""
    model = WIDTHS[name][0](dtype=dtype)
    image = jnp.zeros((1, 64, 64, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))


def _random_variables(name: str, seed: int = 0) -> dict:
    """Kernels with variance 1/fan_in (as Flax's lecun_normal init), random BN affine and
    statistics: filled with numpy, as an eager `model.init` of ~300 layers is slow on CPU."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(_abstract_variables(name)).items():
        shape = leaf.shape
        if path[-1] == "kernel":
            value = rng.normal(0.0, math.sqrt(1.0 / np.prod(shape[:-1])), shape)
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        flat[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("name", sorted(WIDTHS))
@pytest.mark.parametrize("size", [(96, 160), (512, 1024)])
def test_output_shapes(name, size):
    factory, width = WIDTHS[name]
    model = factory()
    variables = _abstract_variables(name)
    image = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x), variables, image)
    expected = [(2, size[0] // s, size[1] // s, width * 2**i) for i, s in enumerate((4, 8, 16, 32))]
    assert [o.shape for o in outputs] == expected
    assert all(o.dtype == jnp.float32 for o in outputs)


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_parameter_counts_match_timm(name):
    variables = _abstract_variables(name)
    counts = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in variables.items()}
    assert counts == PARAM_COUNTS[name]
    # Parameters stay float32 whatever the compute dtype.
    variables = _abstract_variables(name, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_module_names_follow_timm():
    params = _abstract_variables("hrnetv2_w18")["params"]
    paths = {"/".join(p) for p in traverse_util.flatten_dict(params)}
    for path in (
        "conv1/kernel",
        "layer1_0/downsample_0/kernel",
        "transition1_0_0/kernel",
        "transition1_1_0_1/scale",
        "transition3_3_0_0/kernel",
        "stage2_0/branches_1_3/conv2/kernel",
        "stage3_3/fuse_layers_0_2_0/kernel",
        "stage4_2/fuse_layers_3_0_2_1/scale",
    ):
        assert path in paths, path


def test_forward_train_updates_batch_stats():
    model = hrnet.hrnetv2_w18()
    variables = _random_variables("hrnetv2_w18")
    image = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    outputs, updates = model.apply(variables, image, train=True, mutable=["batch_stats"])
    assert [o.shape[1:3] for o in outputs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(bool(jnp.isfinite(o).all()) for o in outputs)
    old = traverse_util.flatten_dict(variables["batch_stats"])
    new = traverse_util.flatten_dict(updates["batch_stats"])
    assert new.keys() == old.keys()
    changed = [k for k in old if not np.allclose(old[k], new[k])]
    assert len(changed) == len(old)  # every BN layer saw the batch


@pytest.mark.parametrize(
    "size,branches",
    # PyTorch conv arithmetic: each stride-2 3x3 conv (pad 1) maps n -> (n + 1) // 2.
    [
        ((100, 150), [(25, 38), (13, 19), (7, 10), (4, 5)]),
        ((20, 64), [(5, 16), (3, 8), (2, 4), (1, 2)]),
    ],
)
def test_any_input_size_works(size, branches):
    """Sizes not divisible by 32: the coarse branches are resized onto the finer ones after
    the 2^k bilinear upsampling (MMSegmentation's fusion), so evaluation at kept-ratio test
    scales works."""
    model = hrnet.hrnetv2_w18()
    variables = _random_variables("hrnetv2_w18")
    image = jax.random.normal(jax.random.key(3), (1, *size, 3))
    outputs = jax.jit(lambda v, x: model.apply(v, x))(variables, image)
    assert [o.shape[1:3] for o in outputs] == branches
    assert all(bool(jnp.isfinite(o).all()) for o in outputs)


def test_bfloat16_matches_float32():
    variables = _random_variables("hrnetv2_w18")
    image = jax.random.normal(jax.random.key(2), (1, 64, 96, 3))
    want = hrnet.hrnetv2_w18().apply(variables, image)
    got = hrnet.hrnetv2_w18(dtype=jnp.bfloat16).apply(variables, image)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16 and g.shape == w.shape
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.abs(g - w).max() <= BF16_RTOL * np.abs(w).max()


@pytest.mark.parity
@pytest.mark.parametrize(
    ("timm_name", "name"), [("hrnet_w18", "hrnetv2_w18"), ("hrnet_w48", "hrnetv2_w48")]
)
def test_parity_with_timm(timm_name, name):
    import torch

    from pne_jax.pretrained import KeyMap, convert_state_dict
    from tests.timm_compat import (
        import_timm,
        randomize_norms,
        relative_error,
        state_dict_numpy,
    )

    timm = import_timm()
    torch.manual_seed(0)
    # The full classification model: its state dict is what real checkpoints hold, head
    # included (dropped by TIMM_IGNORE).
    full = timm.create_model(timm_name, pretrained=False).eval()
    randomize_norms(full)
    state_dict = state_dict_numpy(full)
    # timm's stage-4 branch outputs (no "incre" head): same weights, strict load except
    # for the head that this model lacks.
    features = timm.create_model(
        timm_name,
        pretrained=False,
        features_only=True,
        feature_location="",
        out_indices=(1, 2, 3, 4),
    ).eval()
    missing, unexpected = features.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert all(
        k.split(".")[0] in ("incre_modules", "downsamp_modules", "final_layer", "classifier")
        for k in unexpected
    )

    model = WIDTHS[name][0](fuse_upsample="nearest")  # timm's fusion repeats pixels
    spec = KeyMap(backbone=name, renames=hrnet.TIMM_RENAMES, ignore=hrnet.TIMM_IGNORE)
    variables = convert_state_dict(model, state_dict, spec, name=timm_name)

    image = np.random.default_rng(0).standard_normal((1, 3, 96, 160)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in features(torch.from_numpy(image))]
    got = model.apply(variables, jnp.asarray(image.transpose(0, 2, 3, 1)))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        w = w.transpose(0, 2, 3, 1)
        assert g.shape == w.shape
        error = relative_error(g, w)
        print(f"{timm_name} {w.shape}: relative error {error:.2e}")
        assert error <= 1e-4
