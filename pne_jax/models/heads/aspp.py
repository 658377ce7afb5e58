"""DeepLabV3's head: Atrous Spatial Pyramid Pooling (MMSegmentation's `ASPPHead`).

Parallel branches on the last backbone map, each conv + BN + ReLU to `channels`:
the image-pooling branch (global average, 1x1, broadcast back over the map), a 1x1 conv
for dilation 1 and a 3x3 conv per larger dilation ((1, 12, 24, 36) at output stride 8,
(1, 6, 12, 18) at 16). Their concatenation goes through a 3x3 bottleneck; its output is
the head's feature map (what the PNE code's projection `con_layer` reads), then dropout
and the 1x1 classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import Classifier, InIndex, select_inputs
from pne_jax.models.layers import ConvBNAct, Dtype, global_avg_pool


class ImagePool(nn.Module):
    """Global average -> 1x1 conv + BN + ReLU -> the same vector at every pixel.

    MMSegmentation resizes the 1x1 map bilinearly, which from one pixel is a broadcast.
    """

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pooled = ConvBNAct(self.channels, 1, dtype=self.dtype, name="conv")(
            global_avg_pool(x), train
        )
        return jnp.broadcast_to(pooled, (*x.shape[:3], self.channels))


class ASPPHead(nn.Module):
    """Backbone maps -> (logits [B, h, w, num_classes], features [B, h, w, channels]).

    h, w are those of `features[in_index]` (1/8 of the image for ResNet-D8).
    """

    num_classes: int
    channels: int = 512
    dilations: Sequence[int] = (1, 12, 24, 36)
    dropout: float = 0.1
    in_index: InIndex = -1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        x = select_inputs(features, self.in_index)
        branches = [ImagePool(self.channels, self.dtype, name="image_pool")(x, train)]
        for i, dilation in enumerate(self.dilations):
            branch = ConvBNAct(
                self.channels,
                1 if dilation == 1 else 3,
                dilation=dilation,
                dtype=self.dtype,
                name=f"aspp_{i}",
            )
            branches.append(branch(x, train))
        feats = ConvBNAct(self.channels, 3, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate(branches, axis=-1), train
        )
        logits = Classifier(self.num_classes, self.dropout, name="cls")(feats, train)
        return logits, feats
