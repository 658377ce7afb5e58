"""Swin Transformer backbone: shapes at any size, parameter counts, window and mask
semantics, bf16, stochastic depth; parity with timm (opt-in, `-m parity`)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pne_jax.models.backbones import swin
from pne_jax.pretrained import KeyMap, convert_state_dict

VARIANTS = {"swin_tiny": (swin.swin_tiny, 96), "swin_base": (swin.swin_base, 128)}
SPEC = KeyMap("swin", swin.TIMM_RENAMES, swin.TIMM_IGNORE, swin.TIMM_FRESH)


def _abstract(model, size, batch=2):
    x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
    outs, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x
    )
    return [o.shape for o in outs], variables


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("size", [(100, 150), (96, 160), (33, 250), (512, 512)])
def test_any_input_size_gives_four_strided_stages(name, size):
    # Sizes that are not multiples of 32 nor of the window: patches and merges pad, so
    # each stage is ceil(previous / 2); 100x150 -> 25x38, 13x19, 7x10, 4x5.
    make, dim = VARIANTS[name]
    shapes, _ = _abstract(make(), size)
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    want = []
    for i in range(4):
        want.append((2, h, w, dim * 2**i))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert shapes == want


@pytest.mark.parametrize(
    "name,count",
    # timm 1.0.31 `create_model("swin_tiny_patch4_window7_224" / "swin_base_patch4_window12_384")`:
    # 28_288_354 / 87_903_584 parameters, less the classifier (769_000 / 1_025_000) and
    # the final norm (1_536 / 2_048), plus our four output norms (2 * 15C: 2_880 / 3_840).
    [("swin_tiny", 27_520_698), ("swin_base", 86_880_376)],
)
def test_parameter_counts_match_timm(name, count):
    _, variables = _abstract(VARIANTS[name][0](), (64, 64), batch=1)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == count
    assert set(variables) == {"params"}  # index and masks are computed, not stored


def test_fresh_rule_selects_exactly_the_output_norms():
    _, variables = _abstract(swin.swin_tiny(), (64, 64), batch=1)
    paths = ["/".join(p) for p in traverse_util.flatten_dict(variables)]
    fresh = [p for p in paths if any(re.fullmatch(f, p) for f in swin.TIMM_FRESH)]
    assert sorted(fresh) == [
        f"params/norm{i}/{leaf}" for i in range(4) for leaf in ("bias", "scale")
    ]


def test_relative_position_index_numbers_offsets():
    # Equal index <=> equal (dy, dx) offset; all (2w - 1)^2 offsets occur.
    w = 5
    index = swin.relative_position_index(w)
    rows, cols = np.divmod(np.arange(w * w), w)
    offsets = (rows[:, None] - rows[None, :]) * 100 + (cols[:, None] - cols[None, :])
    pairs = set(zip(index.ravel().tolist(), offsets.ravel().tolist(), strict=True))
    assert (
        len(pairs) == len({i for i, _ in pairs}) == len({o for _, o in pairs}) == (2 * w - 1) ** 2
    )
    assert index.min() == 0 and index.max() == (2 * w - 1) ** 2 - 1


def _random_variables(model, x, std=0.02, seed=0):
    """Random variables (scales 1 + noise, others noise), without running `init` eagerly."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    flat = traverse_util.flatten_dict(variables)
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        noise = rng.normal(0.0, std, leaf.shape).astype(np.float32)
        flat[path] = jnp.asarray(noise + 1.0 if path[-1] == "scale" else noise)
    return traverse_util.unflatten_dict(flat)


def _groups(n: int, window: int, shift: int) -> np.ndarray:
    """Which tokens of an axis of n may interact in one block (mmseg's pad-then-shift).

    The axis is padded to a window multiple, then rolled by -shift: the windows cover
    [shift + k * window, shift + (k + 1) * window) of the padded axis, and the window
    that wraps around is split by the mask into its tail and [0, shift).
    """
    r = np.arange(n)
    return r // window if shift == 0 else np.where(r < shift, 0, 1 + (r - shift) // window)


@pytest.mark.parametrize("shift", [0, 3])
def test_block_mixes_tokens_only_within_padded_shifted_windows(shift):
    """Output token (i, j) depends on input token (k, l) iff they share a window group.

    10x12 tokens with window 7 pad to 14x14; with shift 3 the real tokens fall into row
    groups [0, 3), [3, 10) and column groups [0, 3), [3, 10), [10, 12). Without the
    mask, the window that wraps around would mix the top-left corner with the bottom
    and right edges.
    """
    block = swin.SwinTransformerBlock(dim=8, num_heads=2, window_size=7, shift_size=shift)
    x = jax.random.normal(jax.random.key(0), (1, 10, 12, 8))
    params = _random_variables(block, x, std=0.5)  # large, so every allowed path shows
    jac = jax.jit(jax.jacrev(lambda x: block.apply(params, x)[0].sum(-1)))(
        x
    )  # [10, 12, 1, 10, 12, 8]
    depends = np.abs(np.asarray(jac)).sum(axis=(2, 5)) > 1e-12
    gh, gw = _groups(10, 7, shift), _groups(12, 7, shift)
    same = (gh[:, None, None, None] == gh[None, None, :, None]) & (
        gw[None, :, None, None] == gw[None, None, None, :]
    )
    np.testing.assert_array_equal(depends, same)


@pytest.fixture(scope="module")
def tiny_case():
    model = swin.swin_tiny()
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = _random_variables(model, x)
    return variables, x, jax.jit(model.apply)(variables, x)


def test_small_forward_is_finite(tiny_case):
    _, _, outs = tiny_case
    assert [o.shape for o in outs] == [
        (2, 16, 24, 96),
        (2, 8, 12, 192),
        (2, 4, 6, 384),
        (2, 2, 3, 768),
    ]
    assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_bf16_agrees_with_f32(tiny_case):
    variables, x, f32 = tiny_case
    bf16 = jax.jit(swin.swin_tiny(dtype=jnp.bfloat16).apply)(variables, x)
    for a, b in zip(f32, bf16, strict=True):
        assert b.dtype == jnp.bfloat16
        # Measured 0.007-0.017 (max |difference| / max |f32|, per stage, three seeds, random
        # and initial weights): bf16 keeps 8 bits of mantissa through 12 blocks; softmax and
        # LayerNorm statistics run in f32. Tolerance about 2.5x the worst measured.
        err = np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() / np.abs(a).max()
        assert err < 0.04, err


def test_drop_path_only_in_train_mode():
    # A small Swin (same code path, quick to compile) with a high rate.
    model = swin.SwinTransformer(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.5
    )
    x = jax.random.normal(jax.random.key(1), (4, 32, 48, 3))
    variables = _random_variables(model, x)

    @jax.jit
    def run(keys):
        evaluated = model.apply(variables, x)[-1]  # no rng needed in eval mode
        trained = jax.vmap(
            lambda k: model.apply(variables, x, train=True, rngs={"dropout": k})[-1]
        )(keys)
        plain = model.clone(drop_path_rate=0.0).apply(variables, x, train=True)[-1]
        return evaluated, trained, plain

    evaluated, (a, b), plain = run(jax.random.split(jax.random.key(0)))
    np.testing.assert_array_equal(evaluated, run(jax.random.split(jax.random.key(1)))[0])
    assert not np.allclose(a, evaluated) and not np.allclose(a, b)
    # Without stochastic depth, train mode is eval mode (there is no BatchNorm/dropout).
    np.testing.assert_allclose(plain, evaluated, rtol=1e-5, atol=1e-5)


# --- parity with timm (opt-in) ---------------------------------------------------------


def _timm_reference(arch: str, pad_then_shift: bool = False):
    """Random timm model (eval) with randomised norms and relative position tables.

    Always `always_partition=True, strict_img_size=False`: windows keep their size on any
    input and the masks are built per input (without these, timm shrinks windows and
    drops the shift on stages no larger than a window, e.g. the 7x7 last stage at 224).
    """
    import functools

    import torch

    from tests.timm_compat import import_timm, randomize_norms

    timm = import_timm()
    from timm.layers import PatchEmbed

    model = timm.create_model(
        arch,
        pretrained=False,
        always_partition=True,
        strict_img_size=False,
        embed_layer=functools.partial(PatchEmbed, dynamic_img_pad=True),
    ).eval()
    randomize_norms(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=gen))
    if pad_then_shift:
        import types

        for stage in model.layers:
            for block in stage.blocks:
                block._attn = types.MethodType(_pad_then_shift_attn, block)
    return model


def _pad_then_shift_attn(block, x):
    """timm's window attention with mmseg's order: pad to whole windows, then shift.

    timm shifts first and pads afterwards, so on sizes that are not window multiples
    the wrapped-around tokens share a window with padding rows; mmseg pads first and
    computes the mask on the padded size. This swaps the two steps and otherwise uses
    timm's own partition, mask (built on the padded size) and attention.
    """
    import torch
    import torch.nn.functional as F
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    (wh, ww), shift = block.window_size, block.shift_size
    x = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), dims=(1, 2))
    mask = block.get_attn_mask(x)  # None without shift
    out = block.attn(window_partition(x, (wh, ww)).view(-1, wh * ww, c), mask=mask)
    out = window_reverse(out.view(-1, wh, ww, c), (wh, ww), x.shape[1], x.shape[2])
    if any(shift):
        out = torch.roll(out, shift, dims=(1, 2))
    return out[:, :h, :w]


def _assert_matches(arch: str, ours, size, pad_then_shift: bool = False) -> list[float]:
    """Converted timm weights give timm's four stage features (eval mode, f32).

    timm's stage outputs have no per-stage norm, so ours are compared after their output
    norms `norm{i}` (set to random values) against timm's stage outputs passed through the
    same LayerNorm in torch. Returns the relative errors.
    """
    import torch

    from tests.timm_compat import relative_error, state_dict_numpy

    reference = _timm_reference(arch, pad_then_shift)
    converted = traverse_util.flatten_dict(
        convert_state_dict(ours, state_dict_numpy(reference), SPEC, name=arch)
    )
    _, shapes = _abstract(ours, (64, 64), batch=1)
    rng = np.random.default_rng(2)
    norms = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path not in converted:  # the fresh output norms
            norms[path] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
            if path[-1] == "bias":
                norms[path] = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    variables = traverse_util.unflatten_dict({**converted, **norms})
    x = np.random.default_rng(0).normal(size=(1, *size, 3)).astype(np.float32)
    got = jax.jit(ours.apply)(variables, x)
    with torch.no_grad():
        stages = reference.forward_intermediates(
            torch.as_tensor(x).permute(0, 3, 1, 2), intermediates_only=True
        )
    errors = []
    for i, (g, s) in enumerate(zip(got, stages, strict=True)):
        scale, bias = (torch.as_tensor(norms["params", f"norm{i}", k]) for k in ("scale", "bias"))
        s = s.permute(0, 2, 3, 1)
        want = torch.nn.functional.layer_norm(s, s.shape[-1:], scale, bias, swin.LN_EPSILON)
        assert g.shape == want.shape
        errors.append(relative_error(g, want.numpy()))
    assert max(errors) <= 1e-4, errors
    return errors


@pytest.mark.parity
@pytest.mark.parametrize(
    "arch,ours,size",
    [
        ("swin_tiny_patch4_window7_224", swin.swin_tiny, (224, 448)),
        ("swin_base_patch4_window12_384", swin.swin_base, (384, 768)),
    ],
)
def test_matches_timm_where_no_stage_needs_window_padding(arch, ours, size):
    """Unmodified timm at the smallest non-square sizes where it follows mmseg exactly.

    timm pads to whole windows *after* the cyclic shift, mmseg (and this module) before
    it, so they differ in every shifted block whose feature map is not a window
    multiple (at 96x160 with window 7 all of them: 24x40, 12x20, 6x10, 3x5); no timm
    option changes that order. They agree when every stage is a window multiple, i.e.
    H/32 and W/32 multiples of the window: 224x448 for window 7, 384x768 for window 12.
    """
    _assert_matches(arch, ours(), size)


@pytest.mark.parity
@pytest.mark.parametrize(
    "arch,ours,size",
    [
        ("swin_tiny_patch4_window7_224", swin.swin_tiny, (96, 160)),
        ("swin_tiny_patch4_window7_224", swin.swin_tiny, (100, 150)),
        ("swin_base_patch4_window12_384", swin.swin_base, (96, 160)),
    ],
)
def test_matches_timm_with_padding_before_the_shift(arch, ours, size):
    """Window padding at every stage (and patch/merge padding at 100x150) against timm
    whose blocks pad before shifting (`_pad_then_shift_attn`), i.e. mmseg's semantics."""
    _assert_matches(arch, ours(), size, pad_then_shift=True)
