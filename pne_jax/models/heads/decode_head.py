"""What every decode head shares: picking its input maps and classifying pixels.

MMSegmentation's `BaseDecodeHead` in two pieces: `select_inputs` is its input transform
(one map by index, or several resized to the first one's size and concatenated, the
'resize_concat' of HRNetV2), `Classifier` its `cls_seg` (channel dropout, then a 1x1 conv
with bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.layers import resize

InIndex = int | tuple[int, ...]


def select_inputs(features: Sequence[jax.Array], in_index: InIndex) -> jax.Array:
    """One backbone map (`in_index` an int) or several, bilinearly resized to the size of
    the first selected one and concatenated on channels (`in_index` a tuple)."""
    if isinstance(in_index, int):
        return features[in_index]
    maps = [features[i] for i in in_index]
    size = maps[0].shape[1:3]
    return jnp.concatenate([resize(m, size) for m in maps], axis=-1)


class Classifier(nn.Module):
    """[B, h, w, C] features -> [B, h, w, num_classes] float32 logits.

    `Dropout2d` semantics: in training, whole channels are zeroed per image with
    probability `dropout` (needs the 'dropout' rng); `dropout <= 0` means none, as
    MMSegmentation's `dropout_ratio=-1`. The conv starts as N(0, 0.01), bias 0, and
    computes in float32 whatever the features' dtype: it is cheap, and logits rounded to
    bfloat16 would shift OCRNet's softmax over pixels by up to exp(0.4% of the logit).
    """

    num_classes: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.dropout > 0 and train:
            # By hand rather than nn.Dropout, whose `select` between a replicated mask and
            # a batch-sharded x fails under explicit sharding (`jax.set_mesh`).
            keep = 1.0 - self.dropout
            shape = (x.shape[0], 1, 1, x.shape[-1])
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
            x = x * (mask.astype(jnp.float32) / keep)
        return nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01),
            name="conv_seg",
        )(x)
