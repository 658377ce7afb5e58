"""Decode and projection heads on small inputs: each checked against its formula in numpy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.models.heads import ASPPHead, FCNHead, OCRHead, ProjectionHead, UPerHead
from pne_jax.models.heads.aspp import ImagePool
from pne_jax.models.heads.decode_head import Classifier, select_inputs
from pne_jax.models.heads.ocr import attention_weights, object_regions, spatial_gather
from pne_jax.models.layers import BN_EPSILON, adaptive_avg_pool, resize


def _randomize(variables, seed=0):
    """Random params and running statistics, so formulas are not checked at an init point."""
    leaves, tree = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if "var" in name:
            out.append(jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32))
        else:
            out.append(jnp.asarray(0.3 * rng.normal(size=leaf.shape), jnp.float32))
    return jax.tree.unflatten(tree, out)


def _init(module, *args, seed=0):
    """`module.init` in eval mode, jitted (op-by-op execution compiles every op)."""
    return jax.jit(lambda *a: module.init(jax.random.key(seed), *a, train=False))(*args)


def _apply(module, variables, *args):
    return jax.jit(lambda v, *a: module.apply(v, *a, train=False))(variables, *args)


def _conv_bn_relu(x, v, relu=True):
    """numpy 1x1 ConvBNAct in eval mode from its variables {'params', 'batch_stats'}."""
    y = x @ np.asarray(v["params"]["conv"]["kernel"])[0, 0]
    bn, stats = v["params"]["bn"], v["batch_stats"]["bn"]
    y = (y - stats["mean"]) / np.sqrt(stats["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
    return np.maximum(y, 0) if relu else y


def _sub(variables, *path):
    out = {}
    for col, tree in variables.items():
        for p in path:
            tree = tree[p]
        out[col] = tree
    return out


def _adaptive_pool_np(x, size):
    h, w = x.shape[1:3]
    out = np.zeros((x.shape[0], size, size, x.shape[3]))
    for i in range(size):
        for j in range(size):
            r0, r1 = (i * h) // size, -(-(i + 1) * h // size)
            c0, c1 = (j * w) // size, -(-(j + 1) * w // size)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def test_image_pool_broadcasts_the_pooled_vector():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    module = ImagePool(4)
    v = _randomize(_init(module, x, seed=1))
    out = np.asarray(_apply(module, v, x))
    want = _conv_bn_relu(np.asarray(x).mean(axis=(1, 2)), _sub(v, "conv"))
    np.testing.assert_allclose(out, np.broadcast_to(want[:, None, None], out.shape), atol=1e-5)
    assert np.ptp(want) > 0  # not trivially constant


def test_aspp_head_shapes_and_classifier():
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 8))
    head = ASPPHead(num_classes=5, channels=6, dilations=(1, 2, 3))
    v = _randomize(_init(head, [x], seed=1))
    logits, feats = _apply(head, v, [x])
    assert logits.shape == (2, 9, 11, 5) and feats.shape == (2, 9, 11, 6)
    assert v["params"]["aspp_0"]["conv"]["kernel"].shape == (1, 1, 8, 6)  # dilation 1: 1x1
    assert v["params"]["aspp_2"]["conv"]["kernel"].shape == (3, 3, 8, 6)
    assert v["params"]["bottleneck"]["conv"]["kernel"].shape == (3, 3, 4 * 6, 6)
    cls = v["params"]["cls"]["conv_seg"]
    want = np.asarray(feats) @ np.asarray(cls["kernel"])[0, 0] + np.asarray(cls["bias"])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(7, 10), (13, 5), (6, 6)])
def test_adaptive_avg_pool_matches_pytorch_bins(size):
    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    for bins in (1, 2, 3, 6):
        np.testing.assert_allclose(
            adaptive_avg_pool(jnp.asarray(x), bins), _adaptive_pool_np(x, bins), atol=1e-6
        )


def test_uper_ppm_pools_with_pytorch_bins_and_shapes():
    # Non-divisible sizes: the stride-32 map is 5x7, so bins 2, 3, 6 overlap.
    rng = np.random.default_rng(0)
    sizes = [(20, 28), (10, 14), (5, 7), (5, 7)]
    maps = [
        jnp.asarray(rng.normal(size=(2, h, w, 4 * 2**i)), jnp.float32)
        for i, (h, w) in enumerate(sizes)
    ]
    head = UPerHead(num_classes=3, channels=8)
    v = _init(head, maps, seed=0)
    seen = {}

    def record(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path.startswith("ppm/psp_"):
            if path.endswith("/conv"):
                seen[path] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # eager, to record concrete values
        logits, feats = head.apply(v, maps, train=False)
    assert logits.shape == (2, 20, 28, 3) and feats.shape == (2, 20, 28, 8)
    for i, bins in enumerate((1, 2, 3, 6)):
        got = seen[f"ppm/psp_{i}/conv"]
        np.testing.assert_allclose(got, _adaptive_pool_np(np.asarray(maps[3]), bins), atol=1e-5)


def test_projection_head_is_the_two_layer_formula():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
    head = ProjectionHead(hidden=5, out=7)
    v = _randomize(_init(head, x, seed=1))
    out = _apply(head, v, x)
    hidden = _conv_bn_relu(np.asarray(x), _sub(v, "hidden"))
    want = hidden @ np.asarray(v["params"]["out"]["kernel"])[0, 0] + v["params"]["out"]["bias"]
    assert out.shape == (2, 3, 4, 7)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_object_regions_and_attention_are_softmaxes():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.normal(size=(2, 4, 5, 3)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(2, 4, 5, 6)), jnp.float32)
    regions = np.asarray(object_regions(logits))  # [B, K, h*w]
    np.testing.assert_allclose(regions.sum(-1), 1.0, atol=1e-6)
    flat = np.asarray(logits).reshape(2, 20, 3)
    e = np.exp(flat - flat.max(1, keepdims=True))
    np.testing.assert_allclose(regions, (e / e.sum(1, keepdims=True)).transpose(0, 2, 1), atol=1e-6)
    centres = spatial_gather(feats, logits)
    want = np.einsum("bkn,bnc->bkc", regions, np.asarray(feats).reshape(2, 20, 6))
    np.testing.assert_allclose(centres[:, :, 0], want, atol=1e-5)

    q, k = rng.normal(size=(2, 20, 8)), rng.normal(size=(2, 3, 8))
    attn = np.asarray(attention_weights(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)))
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-6)
    s = np.einsum("bnd,bkd->bnk", q, k) / np.sqrt(8)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(attn, e / e.sum(-1, keepdims=True), atol=1e-5)


def test_ocr_head_uses_the_first_stage_logits():
    rng = np.random.default_rng(0)
    maps = [
        jnp.asarray(rng.normal(size=(2, 8 // 2**i, 8 // 2**i, 3)), jnp.float32) for i in range(4)
    ]
    prev = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    head = OCRHead(num_classes=4, channels=6, ocr_channels=5)
    v = _init(head, maps, prev, seed=0)
    logits, feats = _apply(head, v, maps, prev)
    assert logits.shape == (2, 8, 8, 4) and feats.shape == (2, 8, 8, 6)
    assert v["params"]["bottleneck"]["conv"]["kernel"].shape == (3, 3, 12, 6)
    other, _ = _apply(head, v, maps, prev[:, ::-1])
    assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-4
    with pytest.raises(ValueError, match="differ in size"):
        _apply(head, v, maps, prev[:, :4, :4])


def test_fcn_resize_concat_and_no_conv_head():
    rng = np.random.default_rng(0)
    maps = [
        jnp.asarray(rng.normal(size=(1, 8 // 2**i, 12 // 2**i, 2)), jnp.float32) for i in range(4)
    ]
    x = select_inputs(maps, (0, 1, 2, 3))
    want = np.concatenate([np.asarray(resize(m, (8, 12))) for m in maps], axis=-1)
    np.testing.assert_allclose(x, want)
    # HRNetV2 style: one 1x1 layer as wide as the concatenation, no concat, no dropout.
    head = FCNHead(
        3,
        channels=8,
        num_convs=1,
        kernel_size=1,
        concat_input=False,
        dropout=0.0,
        in_index=(0, 1, 2, 3),
    )
    v = _randomize(_init(head, maps, seed=0))
    logits, feats = _apply(head, v, maps)
    np.testing.assert_allclose(feats, _conv_bn_relu(want, _sub(v, "convs_0")), atol=1e-5)
    assert logits.shape == (1, 8, 12, 3) and "conv_cat" not in v["params"]
    head = FCNHead(3, channels=8, num_convs=0, concat_input=False, in_index=(0, 1, 2, 3))
    _, feats = _apply(head, _init(head, maps), maps)
    np.testing.assert_allclose(feats, want)
    with pytest.raises(ValueError, match="num_convs=0"):
        _init(FCNHead(3, channels=5, num_convs=0), maps)


def test_classifier_dropout_drops_whole_channels():
    x = jnp.ones((2, 6, 7, 16))
    clf = Classifier(16, dropout=0.5)
    v = _init(clf, x, seed=0)
    v = {"params": {"conv_seg": {"kernel": jnp.eye(16)[None, None], "bias": jnp.zeros(16)}}}
    out = np.asarray(clf.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)}))
    per_channel = out.reshape(2, -1, 16)
    assert np.all(per_channel.min(1) == per_channel.max(1))  # constant over pixels
    assert set(np.unique(out)) == {0.0, 2.0}
    np.testing.assert_array_equal(_apply(clf, v, x), x)


def test_heads_under_batch_sharding_match_the_unsharded_batch():
    # Train mode (batch statistics, channel dropout) with the batch sharded over 8
    # devices under an explicit mesh: the same numbers as on one device, up to float32
    # reduction order.
    rng = np.random.default_rng(0)
    maps = [
        jnp.asarray(rng.normal(size=(8, 16 // 2**i, 16 // 2**i, 4)), jnp.float32) for i in range(4)
    ]
    prev = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    heads = {
        "aspp": (ASPPHead(3, channels=8, dilations=(1, 2)), (maps,)),
        "ocr": (OCRHead(3, channels=8, ocr_channels=4, dropout=0.1), (maps, prev)),
        "uper": (UPerHead(3, channels=8), (maps,)),
    }
    mesh = jax.make_mesh((8,), ("data",))
    for name, (head, args) in heads.items():
        v = _init(head, *args, seed=0)

        def forward(v, args, head=head):
            rngs = {"dropout": jax.random.key(1)}
            return head.apply(v, *args, train=True, mutable=["batch_stats"], rngs=rngs)

        want = jax.jit(forward)(v, args)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(args, NamedSharding(mesh, P("data")))
            got = jax.jit(forward)(jax.device_put(v, NamedSharding(mesh, P())), sharded)
        assert not got[0][0].sharding.is_fully_replicated, name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-4 * max(np.abs(b).max(), 1.0), name


@pytest.mark.parametrize(
    ("shape", "mean", "std", "rtol"),
    [
        ((8, 1, 1, 5), 2.0, 3.0, 1e-5),
        ((2, 3, 4, 6), 2.0, 3.0, 1e-5),
        ((8, 1, 1, 5), 300, 0.5, 2e-4),
    ],
)
def test_batch_norm_is_pytorchs(shape, mean, std, rtol):
    """Training: normalised with the biased batch variance, running variance updated with
    the unbiased one (PyTorch's BatchNorm2d; ASPP's 1x1 image-pool map at batch 8 is the
    first shape); evaluation: the running statistics. float64 NumPy reference. In the last
    case (mean 600 spreads) E[x^2] - E[x]^2 in float32 is 2% off the variance: few values
    per channel get two passes (float32's own rounding of the mean is what remains)."""
    from pne_jax.models.layers import batch_norm

    x = np.random.default_rng(0).normal(mean, std, shape).astype(np.float32)
    layer = batch_norm(train=True, name="bn")
    initial = layer.init(jax.random.key(0), x)["batch_stats"]  # init leaves them alone
    np.testing.assert_array_equal(initial["var"], np.ones(shape[-1]))
    stats = {"mean": np.linspace(-1, 1, shape[-1]), "var": np.linspace(0.5, 2, shape[-1])}
    params = {"scale": np.linspace(0.5, 1.5, shape[-1]), "bias": np.linspace(-0.2, 0.2, shape[-1])}
    v = {"params": params, "batch_stats": stats}
    y, updates = layer.apply(v, x, mutable=["batch_stats"])
    x64 = x.astype(np.float64).reshape(-1, shape[-1])
    mean, var = x64.mean(0), x64.var(0)
    n = x64.shape[0]
    want = (x64 - mean) / np.sqrt(var + BN_EPSILON) * params["scale"] + params["bias"]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, shape[-1]), want, rtol=rtol, atol=rtol)
    new = updates["batch_stats"]
    np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5)
    ra_var = 0.9 * stats["var"] + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(new["var"], ra_var, rtol=rtol)
    evaluated = batch_norm(train=False).apply(v, x)
    want = (x - stats["mean"]) / np.sqrt(stats["var"] + BN_EPSILON) * params["scale"]
    np.testing.assert_allclose(evaluated, want + params["bias"], rtol=1e-5, atol=1e-5)


def test_ocr_first_stage_statistics_move_as_run_twice():
    """MMSegmentation runs OCRNet's FCN stage twice per training step on the same batch:
    its running statistics move by 0.9^2; the other heads' once (0.9)."""
    import ml_collections

    from pne_jax.models import build_model

    config = dict(backbone="resnet_tiny_v1c", decode_head="ocr", num_classes=3, projection=False)
    model = build_model(ml_collections.ConfigDict(config))
    assert model.aux_head.bn_momentum == pytest.approx(0.81)
    config["decode_head"] = "aspp"
    assert build_model(ml_collections.ConfigDict(config)).aux_head.bn_momentum == 0.9
