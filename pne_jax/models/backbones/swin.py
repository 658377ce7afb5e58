"""Swin Transformer (Swin-T, Swin-B) backbone for dense prediction, as in UperNet-Swin.

Follows MMSegmentation's `SwinTransformer`, the backbone of UperNet-Swin in the paper:
any input size; the image is zero-padded (bottom/right) to whole patches, every block
zero-pads its (normalised) tokens to whole windows *before* the cyclic shift, and the
shifted-window attention mask is computed on that padded size. Windows never shrink
for small feature maps (timm's classification model does that, and rolls before
padding: see tests/test_swin.py for where the two agree). Each of the four stage
outputs gets its own LayerNorm (`norm0`..`norm3`), as `out_indices=(0, 1, 2, 3)`.

Module names mirror timm's `swin_*_patch4_window*` models (`layers.1.blocks.0.attn.qkv`
-> `layers_1/blocks_0/attn/qkv`; stage i > 0 starts with its PatchMerging, as in timm),
so converted weights map by name. timm's final `norm` has no counterpart: like
MMSegmentation (its converter keeps `norm.*`, which then matches nothing), all four
output norms start fresh (scale 1, bias 0), including `norm3` on the last stage.

Stochastic depth (rates rising linearly from 0 to `drop_path_rate` over all blocks,
0.3 in MMSegmentation's UperNet-Swin configs) is active only with `train=True` and then
needs a 'dropout' rng: `apply(..., train=True, rngs={"dropout": key})`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pne_jax.models.layers import Dtype

# timm keys without a counterpart: classifier, final norm (MMSegmentation drops it too) and
# buffers that older checkpoints stored (the index and masks are computed here).
TIMM_IGNORE = (r"head\..*", r"norm\.(weight|bias)", r".*relative_position_index", r".*attn_mask")
TIMM_RENAMES: tuple[tuple[str, str], ...] = ()
# Our per-stage output norms, which timm lacks: they keep their initial values.
TIMM_FRESH = (r"params/norm[0-3]/(scale|bias)",)

LN_EPSILON = 1e-5  # PyTorch's LayerNorm default (flax's is 1e-6)
MASK_VALUE = -100.0  # added to logits across shifted-window regions, as timm and mmseg do

_dense_init = nn.initializers.truncated_normal(0.02)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon; statistics in float32, float32 parameters."""
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_dense_init,
        name=name,
    )


def relative_position_index(window: int) -> np.ndarray:
    """[N, N] index into the bias table of the offset between tokens a and b (N = window^2).

    Offsets (dy, dx) in [-(w-1), w-1]^2 are numbered row-major: (dy + w - 1) * (2w - 1) +
    (dx + w - 1), the layout of the original Swin tables (and so of the checkpoints).
    """
    rows, cols = np.divmod(np.arange(window * window), window)
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def region_ids(size: int, window: int, shift: int) -> np.ndarray:
    """Region of each position of a padded, shifted axis (`size` a multiple of `window`).

    After the cyclic shift the last window holds two pieces that are not neighbours in the
    image: [size - window, size - shift) and the wrapped-around [size - shift, size).
    """
    ids = np.zeros(size, np.int32)
    ids[size - window : size - shift] = 1
    ids[size - shift :] = 2
    return ids


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> jax.Array:
    """[num_windows, N, N] additive mask (0 or MASK_VALUE) for shifted-window attention on a
    padded `height` x `width` grid: tokens attend only within their own region.

    Built in the graph from the two small region vectors, not stored as a (large) constant.
    """
    rows = jnp.asarray(region_ids(height, window, shift))
    cols = jnp.asarray(region_ids(width, window, shift))
    ids = _partition((rows[:, None] * 3 + cols)[None, :, :, None], window)[0, :, :, 0]
    return jnp.where(ids[:, :, None] == ids[:, None, :], 0.0, MASK_VALUE)


def _partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, C] (H, W multiples of window) -> [B, num_windows, window^2, C], row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def _unpartition(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `_partition`."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def _drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth: drops the whole residual branch per sample (rescaled by 1/keep)."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    dim: int
    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, num_windows, N, C]; mask: [num_windows, N, N] or None."""
        b, nw, n, c = x.shape
        head_dim = self.dim // self.num_heads
        table = self.param(
            "relative_position_bias_table",
            _dense_init,
            ((2 * self.window_size - 1) ** 2, self.num_heads),
            jnp.float32,
        )
        qkv = _dense(3 * self.dim, self.dtype, "qkv")(x)
        qkv = qkv.reshape(b, nw, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        logits = jnp.einsum("bwnhd,bwmhd->bwhnm", q * head_dim**-0.5, k)
        index = relative_position_index(self.window_size).reshape(-1)
        bias = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        logits = logits.astype(jnp.float32) + bias
        if mask is not None:
            logits = logits + mask[:, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhnm,bwmhd->bwnhd", weights, v).reshape(b, nw, n, c)
        return _dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear, as PyTorch's `nn.GELU()`."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = _dense(self.hidden, self.dtype, "fc1")(x)
        out = nn.gelu(out, approximate=False)
        return _dense(x.shape[-1], self.dtype, "fc2")(out)


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted-)window attention and MLP, each with a residual.

    Tokens are padded to whole windows before the shift (zeros after `norm1`), the mask
    is computed on the padded size and the padding is cropped afterwards (mmseg).
    """

    dim: int
    num_heads: int
    window_size: int
    shift_size: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        y = _layer_norm(self.dtype, "norm1")(x)
        y = jnp.pad(y, ((0, 0), (0, -h % ws), (0, -w % ws), (0, 0)))
        hp, wp = y.shape[1:3]
        mask = None
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, shift)
        attn = WindowAttention(self.dim, self.num_heads, ws, self.dtype, name="attn")
        y = _unpartition(attn(_partition(y, ws), mask), ws, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + _drop_path(self, y[:, :h, :w], self.drop_path, train)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(
            _layer_norm(self.dtype, "norm2")(x)
        )
        return x + _drop_path(self, y, self.drop_path, train)


class PatchMerging(nn.Module):
    """2x2 neighbours -> 4C channels (timm's order) -> LayerNorm -> Linear to `out_dim`.

    Odd sizes are zero-padded at the bottom/right first. The 4C channels are ordered
    (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), as in the original
    and timm checkpoints (mmseg's unfold order differs; its converter permutes weights).
    """

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(b, h, 2, w, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h, w, 4 * c)
        x = _layer_norm(self.dtype, "norm")(x)
        return _dense(self.out_dim, self.dtype, "reduction", use_bias=False)(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution (image zero-padded to whole patches) + LN."""

    embed_dim: int
    patch_size: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % p), (0, -x.shape[2] % p), (0, 0)))
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="proj",
        )(x)
        return _layer_norm(self.dtype, "norm")(x)


class SwinTransformerStage(nn.Module):
    """Optional PatchMerging (stages 2-4) then blocks alternating plain/shifted windows."""

    dim: int
    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    drop_paths: Sequence[float]
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.downsample:
            x = PatchMerging(self.dim, self.dtype, name="downsample")(x)
        for i in range(self.depth):
            x = SwinTransformerBlock(
                self.dim,
                self.num_heads,
                self.window_size,
                shift_size=self.window_size // 2 if i % 2 else 0,
                mlp_ratio=self.mlp_ratio,
                drop_path=self.drop_paths[i],
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, train)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone: [B, H, W, 3] (any H, W) -> four LayerNorm-ed stage outputs, finest
    first, [B, ceil(H/4), ceil(W/4), C], ..., [B, ceil(H/32), ceil(W/32), 8C].

    `dtype` is the compute dtype (e.g. bfloat16); parameters, attention softmax and
    LayerNorm statistics stay float32.
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name="patch_embed")(
            x.astype(self.dtype)
        )
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        features, start = [], 0
        for i, depth in enumerate(self.depths):
            x = SwinTransformerStage(
                self.embed_dim * 2**i,
                depth,
                self.num_heads[i],
                self.window_size,
                downsample=i > 0,
                drop_paths=tuple(rates[start : start + depth]),
                mlp_ratio=self.mlp_ratio,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x, train)
            start += depth
            features.append(_layer_norm(self.dtype, f"norm{i}")(x))
        return features


swin_tiny = functools.partial(
    SwinTransformer, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7
)
swin_base = functools.partial(
    SwinTransformer, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
)
