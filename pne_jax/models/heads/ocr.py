"""OCRNet's second stage: object-contextual representations (MMSegmentation's `OCRHead`).

A cascade: a first head (FCN) predicts coarse logits; this head
1. reduces the (HRNetV2: resized and concatenated) backbone maps with a 3x3 conv + BN +
   ReLU to `channels` pixel features;
2. gathers one representation per class, the average of the pixel features weighted by
   that class's softmax over pixels (`spatial_gather`: soft object regions);
3. lets every pixel attend to the class representations (`ObjectAttention`: queries from
   pixels, keys and values from regions, `ocr_channels` wide, scaled dot product,
   softmax over classes), projects the context back to `channels` and fuses it with the
   pixel features (1x1 conv on the concatenation);
4. classifies the fused map, which is the head's feature map.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import Classifier, InIndex, select_inputs
from pne_jax.models.layers import ConvBNAct, Dtype


def object_regions(logits: jax.Array) -> jax.Array:
    """[B, h, w, K] logits -> [B, K, h*w] weights: per class, a softmax over pixels."""
    b, h, w, k = logits.shape
    flat = logits.astype(jnp.float32).reshape(b, h * w, k)
    return jax.nn.softmax(flat, axis=1).transpose(0, 2, 1)


def spatial_gather(feats: jax.Array, logits: jax.Array) -> jax.Array:
    """Pixel features [B, h, w, C] and logits [B, h, w, K] -> [B, K, 1, C] class centres.

    `logits` may be at another resolution than `feats` only if resized by the caller; in
    OCRNet both are at stride 4.
    """
    b, h, w, c = feats.shape
    flat = feats.reshape(b, h * w, c).astype(jnp.float32)  # float32: weights are ~1 / (h*w)
    centres = jnp.einsum("bkn,bnc->bkc", object_regions(logits), flat)
    return centres[:, :, None, :].astype(feats.dtype)


class Projection(nn.Module):
    """A stack of 1x1 conv + BN + ReLU layers (`num_convs` of them) to `channels`."""

    channels: int
    num_convs: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_convs):
            x = ConvBNAct(self.channels, 1, dtype=self.dtype, name=f"layers_{i}")(x, train)
        return x


def attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
    """Query [B, N, D], key [B, K, D] -> [B, N, K] softmax(q k^T / sqrt(D)) over K (float32)."""
    sim = jnp.einsum("bnd,bkd->bnk", query, key, preferred_element_type=jnp.float32)
    return jax.nn.softmax(sim * query.shape[-1] ** -0.5, axis=-1)


class ObjectAttention(nn.Module):
    """Pixels [B, h, w, C] attend to class centres [B, K, 1, C] -> fused [B, h, w, C].

    Query and key projections have two 1x1 layers, value and output one (all with BN and
    ReLU), as MMSegmentation's `ObjectAttentionBlock` (query downsampling scale 1).
    """

    channels: int
    ocr_channels: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, centres: jax.Array, train: bool) -> jax.Array:
        b, h, w, _ = pixels.shape
        d = self.ocr_channels
        query = Projection(d, 2, self.dtype, name="query_project")(pixels, train)
        key = Projection(d, 2, self.dtype, name="key_project")(centres, train)
        value = Projection(d, 1, self.dtype, name="value_project")(centres, train)
        attn = attention_weights(query.reshape(b, h * w, d), key.reshape(b, -1, d))
        context = jnp.einsum("bnk,bkd->bnd", attn.astype(value.dtype), value.reshape(b, -1, d))
        context = context.reshape(b, h, w, d)
        context = Projection(self.channels, 1, self.dtype, name="out_project")(context, train)
        return ConvBNAct(self.channels, 1, dtype=self.dtype, name="bottleneck")(
            jnp.concatenate([context, pixels], axis=-1), train
        )


class OCRHead(nn.Module):
    """Backbone maps and the first stage's logits -> (logits, features [.., channels]).

    `prev_logits` [B, h, w, K] must be at the resolution of the first selected map.
    """

    num_classes: int
    channels: int = 512
    ocr_channels: int = 256
    dropout: float = 0.0
    in_index: InIndex = (0, 1, 2, 3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], prev_logits: jax.Array, train: bool
    ) -> tuple[jax.Array, jax.Array]:
        x = select_inputs(features, self.in_index)
        if prev_logits.shape[1:3] != x.shape[1:3]:
            raise ValueError(
                f"prev_logits {prev_logits.shape} and the head's input {x.shape} differ in size"
            )
        pixels = ConvBNAct(self.channels, 3, dtype=self.dtype, name="bottleneck")(x, train)
        centres = spatial_gather(pixels, prev_logits)
        feats = ObjectAttention(
            self.channels, self.ocr_channels, self.dtype, name="object_context"
        )(pixels, centres, train)
        logits = Classifier(self.num_classes, self.dropout, name="cls")(feats, train)
        return logits, feats
