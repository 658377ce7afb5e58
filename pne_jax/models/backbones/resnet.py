"""ResNet-V1c (deep 3-conv stem, stride on the 3x3 conv), optionally dilated.

MMSegmentation's `ResNetV1c`, the backbone of DeepLabV3/PSPNet in the paper: the stem is
three 3x3 convs (32, 32, 64 channels, the first with stride 2) and a max-pool; stages of
bottlenecks (expansion 4) with the stride on the 3x3 conv. With `output_stride=8`,
stages 3 and 4 keep their resolution and use dilation 2 and 4 instead of striding, the
first block of each dilated stage with half the dilation ("contract dilation", as
`dilations=(1, 1, 2, 4)` with `contract_dilation=True`, and as timm's `output_stride`).

Module names mirror timm's `resnet50c`/`resnet101c` (`conv1.0` -> `conv1_0`,
`layer1.0.downsample.1` -> `layer1_0/downsample_1`) so converted weights map by name.
Returns the four stage outputs (strides 4, 8, 16, 32 without dilation), finest first.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.layers import Dtype, batch_norm, conv, max_pool_3x3_s2

STEM_WIDTH = 32
EXPANSION = 4

# timm checkpoint keys without a counterpart here (the classifier).
TIMM_IGNORE = (r"fc\..*",)
TIMM_RENAMES: tuple[tuple[str, str], ...] = ()


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), residual, ReLU."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = functools.partial(batch_norm, train, self.dtype)
        out = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv(
            self.planes,
            3,
            stride=self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv2",
        )(out)
        out = nn.relu(bn(name="bn2")(out))
        out = conv(self.planes * EXPANSION, 1, dtype=self.dtype, name="conv3")(out)
        out = bn(name="bn3")(out)
        if self.downsample:
            x = conv(
                self.planes * EXPANSION,
                1,
                stride=self.stride,
                dtype=self.dtype,
                name="downsample_0",
            )(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(out + x)


class ResNetV1c(nn.Module):
    """ResNet-V1c backbone; `output_stride` 32 (classification), 16 or 8 (segmentation).

    `base_width` (64) and `stem_width` (32) only change for the small demo variant.
    """

    depths: Sequence[int]
    output_stride: int = 8
    base_width: int = 64
    stem_width: int = STEM_WIDTH
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        bn = functools.partial(batch_norm, train, self.dtype)
        x = x.astype(self.dtype)
        x = conv(self.stem_width, 3, stride=2, dtype=self.dtype, name="conv1_0")(x)
        x = nn.relu(bn(name="conv1_1")(x))
        x = conv(self.stem_width, 3, dtype=self.dtype, name="conv1_3")(x)
        x = nn.relu(bn(name="conv1_4")(x))
        x = conv(2 * self.stem_width, 3, dtype=self.dtype, name="conv1_6")(x)
        x = nn.relu(bn(name="bn1")(x))
        x = max_pool_3x3_s2(x)

        features = []
        in_channels, net_stride, dilation = 2 * self.stem_width, 4, 1
        for stage, depth in enumerate(self.depths):
            planes = self.base_width * 2**stage
            stride = 1 if stage == 0 else 2
            first_dilation = dilation
            if stride > 1 and net_stride >= self.output_stride:
                dilation, stride = dilation * stride, 1
            else:
                net_stride *= stride
            for block in range(depth):
                x = Bottleneck(
                    planes,
                    stride=stride if block == 0 else 1,
                    dilation=first_dilation if block == 0 else dilation,
                    downsample=block == 0 and (stride != 1 or in_channels != planes * EXPANSION),
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
                in_channels = planes * EXPANSION
            features.append(x)
        return features


resnet50_v1c = functools.partial(ResNetV1c, depths=(3, 4, 6, 3))
resnet101_v1c = functools.partial(ResNetV1c, depths=(3, 4, 23, 3))
# A small V1c network for the CPU demo and tests (not from the paper; no timm weights).
resnet_tiny_v1c = functools.partial(ResNetV1c, depths=(1, 1, 1, 1), base_width=16, stem_width=16)
