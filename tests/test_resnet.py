"""ResNet-V1c: shapes, dilation, parameter counts, precision; parity with timm (opt-in)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pne_jax.models import build_backbone


def _shapes(name, size, **kwargs):
    model = build_backbone(name, **kwargs)
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    outs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return [o.shape for o in outs], variables


@pytest.mark.parametrize(
    "output_stride,strides", [(32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))]
)
def test_output_strides_and_channels(output_stride, strides):
    shapes, _ = _shapes("resnet50_v1c", (512, 1024), output_stride=output_stride)
    assert shapes == [
        (2, 512 // s, 1024 // s, c) for s, c in zip(strides, (256, 512, 1024, 2048), strict=True)
    ]


def test_odd_sizes_follow_pytorch_conv_arithmetic():
    # 97 -> 49 (conv s2, pad 1) -> 25 (max-pool s2, pad 1) -> 13 -> 7 -> 4.
    shapes, _ = _shapes("resnet50_v1c", (97, 161), output_stride=32)
    assert [s[1:3] for s in shapes] == [(25, 41), (13, 21), (7, 11), (4, 6)]


@pytest.mark.parametrize(
    "name,count",
    # timm 1.0.31: sum of parameter sizes of create_model("resnet50c" / "resnet101c",
    # features_only=True), i.e. without the classifier.
    [("resnet50_v1c", 23_527_264), ("resnet101_v1c", 42_519_392)],
)
def test_parameter_counts_match_timm(name, count):
    _, variables = _shapes(name, (64, 64))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == count


def test_dilated_stages_contract_the_first_dilation():
    # With output_stride=8 the first block of stage 3 uses dilation 1 and the others 2
    # (stage 4: 2, then 4): a single active pixel spreads accordingly.
    model = build_backbone("resnet50_v1c", output_stride=8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    conv2 = variables["params"]["layer3_0"]["conv2"]["kernel"]
    assert conv2.shape == (3, 3, 256, 256)
    jaxpr = str(
        jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(jnp.zeros((1, 64, 64, 3)))
    )
    assert "rhs_dilation=(2, 2)" in jaxpr and "rhs_dilation=(4, 4)" in jaxpr


def test_train_mode_updates_batch_stats_and_bf16_agrees():
    model = build_backbone("resnet50_v1c", output_stride=8)
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    outs, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = variables["batch_stats"]["layer1_0"]["bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["layer1_0"]["bn1"]["mean"], before)
    f32 = model.apply(variables, x, train=False)
    bf16 = build_backbone("resnet50_v1c", output_stride=8, dtype=jnp.bfloat16).apply(
        variables, x, train=False
    )
    for a, b in zip(f32, bf16, strict=True):
        assert b.dtype == jnp.bfloat16
        # bf16 keeps 8 bits of mantissa; 50 layers accumulate to a few percent of the
        # largest activation.
        err = np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() / np.abs(a).max()
        assert err < 0.05, err


def test_bad_output_stride():
    model = build_backbone("resnet50_v1c", output_stride=4)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*resnet101_v1c"):
        build_backbone("resnet18")


@pytest.mark.parity
@pytest.mark.parametrize(
    "arch,ours,output_stride",
    [
        ("resnet50c", "resnet50_v1c", 32),
        ("resnet50c", "resnet50_v1c", 8),
        ("resnet101c", "resnet101_v1c", 8),
    ],
)
def test_matches_timm(arch, ours, output_stride):
    """timm's random model, converted, gives timm's features (96x160, eval mode)."""
    import torch

    from pne_jax.pretrained import convert_timm
    from tests.timm_compat import import_timm, randomize_norms, relative_error, state_dict_numpy

    timm = import_timm()
    kwargs = {} if output_stride == 32 else {"output_stride": output_stride}
    reference = timm.create_model(arch, pretrained=False, **kwargs).eval()
    randomize_norms(reference)
    features = timm.create_model(
        arch, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), **kwargs
    )
    features.load_state_dict(reference.state_dict(), strict=False)
    features.eval()
    x = np.random.default_rng(0).normal(size=(2, 96, 160, 3)).astype(np.float32)
    with torch.no_grad():
        want = [
            f.permute(0, 2, 3, 1).numpy() for f in features(torch.as_tensor(x).permute(0, 3, 1, 2))
        ]
    variables = convert_timm(arch, state_dict_numpy(reference))
    got = build_backbone(ours, output_stride=output_stride).apply(variables, x, train=False)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert relative_error(g, w) < 1e-4
