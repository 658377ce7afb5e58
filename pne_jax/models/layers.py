"""Building blocks shared by backbones and heads: conv + BN + ReLU, pooling, resizing.

All modules are channels-last (NHWC) and mirror PyTorch/MMSegmentation semantics so that
converted weights give the same numbers: explicit symmetric padding (not 'SAME', which
pads strided convolutions asymmetrically), BatchNorm as PyTorch's (momentum 0.1, epsilon
1e-5, running variance updated with the unbiased batch variance), bilinear resizing with
half-pixel centres (`align_corners=False`).

Under `jax.jit` with the batch sharded over devices, BatchNorm's batch statistics are
already reduced over the global batch (the equivalent of SyncBN): no `axis_name`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# Up to this many values per channel (ASPP's image pool: the batch size; pooled maps, OCR's
# class centres), BatchNorm computes the variance in two passes: E[x^2] - E[x]^2 loses
# digits when the mean is large against the spread, and a second pass over so few values
# costs nothing. Larger maps keep the one-pass form (one fusion, as Flax).
TWO_PASS_VARIANCE_MAX = 4096


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's `BatchNorm2d` semantics.

    Flax's `nn.BatchNorm` updates the running variance with the biased batch variance;
    PyTorch (and SyncBN, hence MMSegmentation) normalise with the biased one but keep the
    unbiased one, n / (n - 1) larger: it matters where a channel sees few values, as the
    1x1 maps of ASPP's image pool (n = batch size). Variables as Flax's: params
    `scale`, `bias`; batch_stats `mean`, `var`. Statistics are float32 over the global
    batch (the whole array under `jax.jit`, so SyncBN when the batch is sharded), the
    variance in two passes where a channel has few values (`TWO_PASS_VARIANCE_MAX`); the
    running statistics do not change during `init`.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            n = x.size // features
            if n <= TWO_PASS_VARIANCE_MAX:
                var = jnp.mean(jnp.square(xf - mean), axes)
            else:  # E[x^2] - E[x]^2 in one fusion (as Flax), clipped at 0 against round-off
                var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * unbiased
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        return ((x - mean) * mul + bias).astype(self.dtype)


def batch_norm(
    train: bool,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
    momentum: float = BN_MOMENTUM,
) -> BatchNorm:
    """PyTorch-style BatchNorm (`BatchNorm`); float32 parameters and statistics.

    `momentum` is the weight of the old running statistics (PyTorch's 1 - momentum).
    """
    return BatchNorm(use_running_average=not train, momentum=momentum, dtype=dtype, name=name)


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-style k x k convolution with padding dilation * (k - 1) // 2 on each side."""
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + optional ReLU: MMCV's `ConvModule` with BN and ReLU.

    Parameters live under `conv` and `bn`; `bn_momentum` as `batch_norm`'s `momentum`.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    act: bool = True
    bn_momentum: float = BN_MOMENTUM
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(
            self.features,
            self.kernel,
            stride=self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = batch_norm(train, self.dtype, name="bn", momentum=self.bn_momentum)(x)
        return nn.relu(x) if self.act else x


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's `MaxPool2d(3, stride=2, padding=1)` (padding never wins: it is -inf)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def resize(x: jax.Array, size: tuple[int, int], method: str = "bilinear") -> jax.Array:
    """Resize [B, H, W, C] to [B, *size, C] like `F.interpolate(..., align_corners=False)`.

    Bilinear with half-pixel centres and no antialiasing (PyTorch does not antialias,
    also when downsampling); 'nearest' takes `floor(i * in / out)` as PyTorch does.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:3]) == size:
        return x
    if method == "nearest":
        rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
        cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
        return x[:, rows][:, :, cols]
    if method != "bilinear":
        raise ValueError(f"resize method must be 'bilinear' or 'nearest', got {method!r}")
    out = jax.image.resize(
        x.astype(jnp.float32), (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False
    )
    return out.astype(x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 1, 1, C] mean, in float32 for accuracy under bf16."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)


def _bin_matrix(size_in: int, size_out: int) -> jnp.ndarray:
    """[size_out, size_in] averaging weights of PyTorch's adaptive pooling bins.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)): bins overlap when `in`
    is not a multiple of `out`, exactly as `nn.AdaptiveAvgPool2d`.
    """
    weights = []
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        weights.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size_in)])
    return jnp.asarray(weights, jnp.float32)


def adaptive_avg_pool(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, *size, C] like PyTorch's `AdaptiveAvgPool2d(size)`.

    Each output cell is the mean of its (possibly overlapping) bin of rows and columns;
    computed as two small averaging matmuls in float32.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = _bin_matrix(x.shape[1], out_h)
    cols = _bin_matrix(x.shape[2], out_w)
    pooled = jnp.einsum(
        "ph,bhwc,qw->bpqc", rows, x.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST
    )
    return pooled.astype(x.dtype)
