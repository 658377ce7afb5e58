"""Segmentors of the paper: output shapes at full size, sharded BatchNorm, bf16, bad configs.

Shapes at full size come from `jax.eval_shape` (no compute). Numeric tests run small
models on small inputs, with random variables drawn in numpy from the `eval_shape` of
`init` (compiling HRNet's `init` alone takes a minute on two CPU cores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.models import BACKBONES, build_model, numpy_init

# The paper's models: (config, image size, logits stride, aux-logits stride).
PAPER_MODELS = {
    "deeplabv3_r101_d8_cityscapes": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=19),
        (512, 1024),
        8,
        8,
    ),
    "fcn_hrnetv2_w48_cityscapes": (
        dict(backbone="hrnetv2_w48", decode_head="fcn", num_classes=19),
        (512, 1024),
        4,
        None,
    ),
    "ocrnet_hrnetv2_w48_cityscapes": (
        dict(backbone="hrnetv2_w48", decode_head="ocr", num_classes=19),
        (512, 1024),
        4,
        4,
    ),
    "deeplabv3_r101_d8_ade20k": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=150),
        (512, 512),
        8,
        8,
    ),
    "deeplabv3_r101_d8_cocostuff": (
        dict(backbone="resnet101_v1c", output_stride=8, decode_head="aspp", num_classes=171),
        (512, 512),
        8,
        8,
    ),
    "upernet_swin_t_ade20k": (
        dict(backbone="swin_tiny", decode_head="uper", num_classes=150, drop_path_rate=0.3),
        (512, 512),
        4,
        16,
    ),
    "upernet_swin_b_ade20k": (
        dict(backbone="swin_base", decode_head="uper", num_classes=150, drop_path_rate=0.3),
        (512, 512),
        4,
        16,
    ),
}


def _model(**config):
    return build_model(ml_collections.ConfigDict(config))


def _random_variables(model, x, seed=0):
    """`numpy_init.random_variables`, as jax arrays."""
    return jax.tree.map(jnp.asarray, numpy_init.random_variables(model, x, seed))


def test_every_backbone_of_the_paper_and_the_tests_is_registered():
    # A dropped backbone must fail here (and in the tests below), never be skipped.
    expected = {"resnet50_v1c", "resnet101_v1c", "hrnetv2_w18", "hrnetv2_w48"}
    expected |= {"swin_tiny", "swin_base"}
    used = {config["backbone"] for config, *_ in PAPER_MODELS.values()}
    used |= {config["backbone"] for config in BF16_MODELS.values()}
    assert used == expected
    missing = expected - set(BACKBONES)
    assert not missing, f"backbones not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_models_output_shapes(name):
    config, (h, w), stride, aux_stride = PAPER_MODELS[name]
    model = _model(**config)
    x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    k = config["num_classes"]
    assert set(variables["params"]) >= {"backbone", "decode_head", "projection"}
    assert out["logits"].shape == (2, h // stride, w // stride, k)
    assert out["embeddings"].shape == (2, h // stride, w // stride, 256)
    if aux_stride is None:
        assert out["aux_logits"] is None and "aux_head" not in variables["params"]
    else:
        assert out["aux_logits"].shape == (2, h // aux_stride, w // aux_stride, k)
    assert all(o.dtype == jnp.float32 for o in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "name,millions,tolerance",
    # Without the PNE projection head (auxiliary heads included, as published).
    # HRNet paper (Wang et al., TPAMI 2020), Cityscapes comparison: HRNetV2-W48 65.9M;
    # OCR paper (Yuan et al., ECCV 2020): HRNetV2-W48 + OCR 70.3M; the Swin segmentation
    # repo's README (SwinTransformer/Swin-Transformer-Semantic-Segmentation), UPerNet on
    # ADE20K: Swin-T 60M, Swin-B 121M (rounded to 1M; their Swin-B has window 7, ours 12).
    [
        ("fcn_hrnetv2_w48_cityscapes", 65.9, 0.1),
        ("ocrnet_hrnetv2_w48_cityscapes", 70.3, 0.1),
        ("upernet_swin_t_ade20k", 60.0, 0.5),
        ("upernet_swin_b_ade20k", 121.0, 0.5),
    ],
)
def test_parameter_counts_match_the_papers(name, millions, tolerance):
    config = dict(PAPER_MODELS[name][0], projection=False)
    model = _model(**config)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    count = sum(p.size for p in jax.tree.leaves(variables["params"]))
    assert abs(count / 1e6 - millions) < tolerance, count


def test_projection_feature_and_disabled_parts():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    base = dict(backbone="resnet50_v1c", output_stride=16, decode_head="aspp", num_classes=3)
    for feature, width in (("backbone:3", 2048), ("aux", 256), ("backbone", 3840)):
        model = _model(**base, projection=dict(feature=feature, out=32))
        v = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), x)
        out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x), v, x)
        assert out["embeddings"].shape == (1, 4, 4, 32)  # resized to the logits' size
        assert v["params"]["projection"]["hidden"]["conv"]["kernel"].shape[2] == width
    model = _model(**base, projection=False, aux_head=False)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert out["embeddings"] is None and out["aux_logits"] is None
    assert set(v["params"]) == {"backbone", "decode_head"}


def test_sharded_batchnorm_matches_the_global_batch():
    # Train mode, batch 8 sharded over 8 devices: BatchNorm must use the statistics of
    # the whole batch (SyncBN), so outputs and updated running statistics equal those of
    # the unsharded batch up to float32 reduction order. Tolerances, relative to the
    # largest entry: running statistics 1e-5 (measured 2.4e-6), outputs 1e-3 (measured
    # 1.4e-4: BatchNorm over the 8 pooled vectors of ASPP's image branch amplifies
    # rounding). Per-device statistics would be off by O(1).
    model = _model(
        backbone="resnet50_v1c",
        decode_head="aspp",
        num_classes=5,
        channels=16,
        aux_head=dict(channels=16),
        projection=dict(hidden=16, out=8),
    )
    x = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
    variables = _random_variables(model, x)

    def forward(v, x):
        rngs = {"dropout": jax.random.key(2)}
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)

    want = jax.jit(forward)(variables, x)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        vs = jax.device_put(variables, NamedSharding(mesh, P()))
        got = jax.jit(forward)(vs, xs)
    assert len(got[0]["logits"].sharding.device_set) == 8
    assert not got[0]["logits"].sharding.is_fully_replicated
    for tol, got_part, want_part in ((1e-3, got[0], want[0]), (1e-5, got[1], want[1])):
        for a, b in zip(jax.tree.leaves(got_part), jax.tree.leaves(want_part), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1.0)
    before = variables["batch_stats"]["decode_head"]["bottleneck"]["bn"]["mean"]
    after = got[1]["batch_stats"]["decode_head"]["bottleneck"]["bn"]["mean"]
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3


BF16_MODELS = {
    # Small members of each family; FCN-HRNetV2 is OCRNet's first stage (its aux logits).
    "deeplabv3_r50_d8": dict(backbone="resnet50_v1c", decode_head="aspp", num_classes=19),
    "ocrnet_hrnetv2_w18": dict(backbone="hrnetv2_w18", decode_head="ocr", num_classes=19),
    "upernet_swin_t": dict(backbone="swin_tiny", decode_head="uper", num_classes=150),
}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_forward_agrees_with_float32(name):
    # Eval mode, same float32 variables. Tolerance: relative L2 error
    # |bf16 - f32| / |f32| <= 3e-2 for every output (bf16 keeps 8 mantissa bits; measured
    # 0.7-1.5%, the most for OCRNet, whose softmax over pixels amplifies logit errors).
    config = BF16_MODELS[name]
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    f32, bf16 = _model(**config), _model(**config, dtype="bfloat16")
    variables = _random_variables(f32, x)
    want = jax.jit(lambda v, x: f32.apply(v, x))(variables, x)
    got = jax.jit(lambda v, x: bf16.apply(v, x))(variables, x)
    for key, b in want.items():
        if b is None:
            continue
        a = got[key]
        assert a.dtype == b.dtype == jnp.float32, key
        err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert 0 < err < 3e-2, (key, err)  # > 0: the bf16 model does compute in bf16
    leaves = jax.tree.leaves(variables)
    assert all(p.dtype == jnp.float32 for p in leaves)

    # No float64 anywhere, even with x64 enabled (where a stray numpy or Python float
    # would promote): every module's output (captured intermediates), the outputs and
    # the updated statistics, in train mode. (The jaxpr itself then has float64 inside
    # jax.image.resize and jax.random, which is not ours.)
    with jax.enable_x64(True):
        for model, compute in ((f32, jnp.float32), (bf16, jnp.bfloat16)):
            out, state = jax.eval_shape(
                lambda v, x, m=model: m.apply(
                    v,
                    x,
                    train=True,
                    mutable=["batch_stats", "intermediates"],
                    capture_intermediates=True,
                    rngs={"dropout": jax.random.key(0)},
                ),
                variables,
                x,
            )
            dtypes = {leaf.dtype for leaf in jax.tree.leaves((out, state))}
            assert dtypes <= {np.dtype(jnp.float32), np.dtype(jnp.bfloat16)}, (name, dtypes)
            features = state["intermediates"]["backbone"]["__call__"][0]
            assert all(f.dtype == compute for f in features), name


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(backbone="resnet18"), "known backbones: hrnetv2_w18, hrnetv2_w48, resnet101_v1c"),
        (dict(decode_head="psp"), "known decode heads: aspp, fcn, ocr, uper"),
        (dict(dtype="float16"), "known dtypes: bfloat16, float32"),
        (dict(num_clases=3), "unknown model config key 'num_clases'; known .*num_classes"),
        (dict(projection=dict(feature="neck")), "known: 'decode', 'aux'"),
        (dict(projection=dict(widht=3)), "unknown projection option 'widht'; known .*hidden"),
        (dict(aux_head=dict(chanels=3)), "unknown aux_head option 'chanels'"),
        (dict(decode_head="ocr", aux_head=False), "cascade"),
        (dict(backbone="hrnetv2_w18", output_stride=8), "output_stride applies to resnet"),
    ],
)
def test_bad_configs_say_what_is_known(change, match):
    config = dict(backbone="resnet50_v1c", decode_head="aspp", num_classes=3) | change
    with pytest.raises(ValueError, match=match):
        _model(**config)
