"""UPerNet's head: a pyramid pooling module on the coarsest map plus an FPN
(MMSegmentation's `UPerHead`, the decode head of UperNet-Swin).

- PPM: the stride-32 map, average-pooled to 1x1, 2x2, 3x3 and 6x6 bins (PyTorch's
  adaptive pooling, overlapping bins when the size is not a multiple), each 1x1 conv +
  BN + ReLU to `channels` and resized back; concatenated with the map, 3x3 bottleneck.
- FPN: 1x1 laterals on the finer maps, top-down (each level plus the next coarser one
  upsampled), a 3x3 conv per level except the PPM output; all levels upsampled to
  stride 4, concatenated, 3x3 bottleneck: the head's feature map.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import Classifier
from pne_jax.models.layers import ConvBNAct, Dtype, adaptive_avg_pool, resize


class PPM(nn.Module):
    """[B, h, w, C] -> [B, h, w, channels]: pooled context at several scales, fused."""

    channels: int
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        outs = [x]
        for i, scale in enumerate(self.pool_scales):
            pooled = adaptive_avg_pool(x, scale)
            pooled = ConvBNAct(self.channels, 1, dtype=self.dtype, name=f"psp_{i}")(pooled, train)
            outs.append(resize(pooled, x.shape[1:3]))
        return ConvBNAct(self.channels, 3, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate(outs, axis=-1), train
        )


class UPerHead(nn.Module):
    """Four backbone maps (strides 4..32) -> (logits, features), both at the finest map's
    size: [B, H/4, W/4, num_classes] and [B, H/4, W/4, channels]."""

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    in_index: Sequence[int] = (0, 1, 2, 3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        maps = [features[i] for i in self.in_index]
        laterals = [
            ConvBNAct(self.channels, 1, dtype=self.dtype, name=f"lateral_{i}")(m, train)
            for i, m in enumerate(maps[:-1])
        ]
        laterals.append(
            PPM(self.channels, self.pool_scales, self.dtype, name="ppm")(maps[-1], train)
        )
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
        outs = [
            ConvBNAct(self.channels, 3, dtype=self.dtype, name=f"fpn_{i}")(lat, train)
            for i, lat in enumerate(laterals[:-1])
        ]
        outs.append(laterals[-1])
        size = outs[0].shape[1:3]
        feats = ConvBNAct(self.channels, 3, dtype=self.dtype, name="fpn_bottleneck")(
            jnp.concatenate([resize(o, size) for o in outs], axis=-1), train
        )
        logits = Classifier(self.num_classes, self.dropout, name="cls")(feats, train)
        return logits, feats
