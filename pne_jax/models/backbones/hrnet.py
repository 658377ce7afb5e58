"""HRNetV2 (W18, W48): parallel multi-resolution branches with repeated fusion.

MMSegmentation's `HRNet` backbone as used by FCN-HRNetV2 and OCRNet, which has the same
structure and weights as timm's `hrnet_w18`/`hrnet_w48` (not the same fusion):

- stem: two stride-2 3x3 convs (64 channels), then `layer1`, four bottlenecks (256 out);
- `transition{1,2,3}` open a new branch at half the resolution (strided 3x3 conv) and
  adapt channels of the existing ones (3x3 conv, only where they differ);
- `stage{2,3,4}` are 1, 4 and 3 HR modules of 2, 3 and 4 branches (w, 2w, 4w, 8w
  channels at strides 4, 8, 16, 32), each branch four basic blocks, followed by a fusion
  that gives every branch the sum of all branches: coarser ones through 1x1 conv + BN +
  bilinear upsampling by 2^k (half-pixel centres, `align_corners=False`), then a bilinear
  resize onto the finer branch, which only matters for sizes not divisible by 32 (any
  input size works); finer ones through k strided 3x3 conv + BN (ReLU between). That is
  MMSegmentation's fusion (tests/test_mmseg_parity.py); timm and HRNet's classification
  code upsample by repeating pixels, `fuse_upsample="nearest"` (tests/test_hrnet.py).

Module names mirror timm's (`stage2.0.branches.1.0.conv1` -> `stage2_0/branches_1_0/conv1`,
`stage3.0.fuse_layers.2.0.1.0` -> `stage3_0/fuse_layers_2_0_1_0`), so converted weights
map by name. Returns the four branch outputs of stage 4, finest first (not timm's
classification-head "incre" features, whose weights `TIMM_IGNORE` drops).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.backbones.resnet import EXPANSION, Bottleneck
from pne_jax.models.layers import Dtype, batch_norm, conv, resize

STEM_WIDTH = 64
LAYER1_BLOCKS = 4
BRANCH_BLOCKS = 4
# HR modules in stages 2, 3 and 4 (stage s has s branches).
STAGE_MODULES = (1, 4, 3)

# timm checkpoint keys without a counterpart here: the classification head.
TIMM_IGNORE = (
    r"incre_modules\..*",
    r"downsamp_modules\..*",
    r"final_layer\..*",
    r"classifier\..*",
)
TIMM_RENAMES: tuple[tuple[str, str], ...] = ()


class BasicBlock(nn.Module):
    """3x3 -> 3x3, residual, ReLU (ResNet's basic block, as in timm and MMSegmentation)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = functools.partial(batch_norm, train, self.dtype)
        out = conv(self.features, 3, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn(name="bn1")(out))
        out = conv(self.features, 3, dtype=self.dtype, name="conv2")(out)
        out = bn(name="bn2")(out)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, dtype=self.dtype, name="downsample_0")(x)
            x = bn(name="downsample_1")(x)
        return nn.relu(out + x)


FUSE_UPSAMPLING = ("bilinear", "nearest")


def _upsample(x: jax.Array, factor: int, method: str) -> jax.Array:
    """`nn.Upsample(scale_factor=factor, mode=method)` on NHWC ('nearest' repeats pixels)."""
    if method == "nearest":
        return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
    return resize(x, (x.shape[1] * factor, x.shape[2] * factor))


class HRModule(nn.Module):
    """Parallel branches of basic blocks, then the all-to-all multi-resolution fusion.

    Branch i has `channels[i]` channels at half the resolution of branch i - 1.
    `fuse_upsample` is how coarser branches are upsampled: 'bilinear' or 'nearest'.
    """

    channels: tuple[int, ...]
    num_blocks: int = BRANCH_BLOCKS
    fuse_upsample: str = "bilinear"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: list[jax.Array], train: bool) -> list[jax.Array]:
        bn = functools.partial(batch_norm, train, self.dtype)
        xs = list(xs)
        for i, width in enumerate(self.channels):
            for b in range(self.num_blocks):
                xs[i] = BasicBlock(width, dtype=self.dtype, name=f"branches_{i}_{b}")(xs[i], train)

        fused = []
        for i, width in enumerate(self.channels):
            y = xs[i]
            for j, x in enumerate(xs):
                name = f"fuse_layers_{i}_{j}"
                if j > i:  # coarser: 1x1 conv to branch i's width, BN, upsample by 2^(j - i)
                    x = conv(width, 1, dtype=self.dtype, name=f"{name}_0")(x)
                    x = _upsample(bn(name=f"{name}_1")(x), 2 ** (j - i), self.fuse_upsample)
                    # Sizes not divisible by 32 overshoot by a pixel or so: resize onto the
                    # finer branch as MMSegmentation does (a no-op when they already match).
                    x = resize(x, y.shape[1:3])
                elif j < i:  # finer: i - j strided 3x3 convs, the last to branch i's width
                    for k in range(i - j):
                        last = k == i - j - 1
                        x = conv(
                            width if last else self.channels[j],
                            3,
                            stride=2,
                            dtype=self.dtype,
                            name=f"{name}_{k}_0",
                        )(x)
                        x = bn(name=f"{name}_{k}_1")(x)
                        x = x if last else nn.relu(x)
                else:
                    continue
                y = y + x
            fused.append(nn.relu(y))
        return fused


class HRNet(nn.Module):
    """HRNetV2 backbone: returns stage 4's branches (w, 2w, 4w, 8w channels at strides
    4, 8, 16, 32), finest first, in `dtype` (parameters stay float32).

    `fuse_upsample`: 'bilinear' (MMSegmentation's segmentation HRNet, the default) or
    'nearest' (timm's and HRNet-classification's).
    """

    width: int = 18
    fuse_upsample: str = "bilinear"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if self.fuse_upsample not in FUSE_UPSAMPLING:
            raise ValueError(
                f"fuse_upsample must be one of {FUSE_UPSAMPLING}, got {self.fuse_upsample!r}"
            )
        bn = functools.partial(batch_norm, train, self.dtype)
        x = x.astype(self.dtype)
        x = conv(STEM_WIDTH, 3, stride=2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(bn(name="bn1")(x))
        x = conv(STEM_WIDTH, 3, stride=2, dtype=self.dtype, name="conv2")(x)
        x = nn.relu(bn(name="bn2")(x))
        for b in range(LAYER1_BLOCKS):
            x = Bottleneck(STEM_WIDTH, downsample=b == 0, dtype=self.dtype, name=f"layer1_{b}")(
                x, train
            )

        xs, previous = [x], (STEM_WIDTH * EXPANSION,)
        for stage, num_modules in enumerate(STAGE_MODULES, start=2):
            channels = tuple(self.width * 2**i for i in range(stage))
            xs = self._transition(xs, previous, channels, f"transition{stage - 1}", train)
            for m in range(num_modules):
                xs = HRModule(
                    channels,
                    fuse_upsample=self.fuse_upsample,
                    dtype=self.dtype,
                    name=f"stage{stage}_{m}",
                )(xs, train)
            previous = channels
        return xs

    def _transition(
        self,
        xs: list[jax.Array],
        previous: tuple[int, ...],
        channels: tuple[int, ...],
        name: str,
        train: bool,
    ) -> list[jax.Array]:
        """Existing branches: 3x3 conv + BN + ReLU where the width changes, else as is.
        New branches: strided 3x3 conv + BN + ReLU chain from the coarsest input."""
        bn = functools.partial(batch_norm, train, self.dtype)
        out = []
        for i, width in enumerate(channels):
            if i < len(previous):
                x = xs[i]
                if previous[i] != width:
                    x = conv(width, 3, dtype=self.dtype, name=f"{name}_{i}_0")(x)
                    x = nn.relu(bn(name=f"{name}_{i}_1")(x))
            else:
                x = xs[-1]
                steps = i + 1 - len(previous)
                for k in range(steps):
                    features = width if k == steps - 1 else previous[-1]
                    x = conv(features, 3, stride=2, dtype=self.dtype, name=f"{name}_{i}_{k}_0")(x)
                    x = nn.relu(bn(name=f"{name}_{i}_{k}_1")(x))
            out.append(x)
        return out


hrnetv2_w18 = functools.partial(HRNet, width=18)
hrnetv2_w48 = functools.partial(HRNet, width=48)
