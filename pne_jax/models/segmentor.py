"""Backbone + decode head (+ auxiliary head) (+ PNE projection head): one segmentation model.

MMSegmentation's `EncoderDecoder` and, with `cascade=True`, its two-stage
`CascadeEncoderDecoder` (OCRNet: the auxiliary FCN head's logits are the first stage,
fed to the OCR head, and trained with weight 0.4 as the auxiliary loss). Outputs stay at
feature resolution; upsampling to the label size is the loss's business.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import select_inputs
from pne_jax.models.layers import resize


def check_projection_feature(feature: str) -> None:
    """Raise ValueError unless `feature` names a map the projection head can read:
    'decode' / 'aux' (that head's feature map before its classifier), 'backbone' (all
    backbone maps resized to the finest and concatenated) or 'backbone:<i>' (map i)."""
    if feature in ("decode", "aux", "backbone"):
        return
    if feature.startswith("backbone:") and feature[len("backbone:") :].lstrip("-").isdigit():
        return
    raise ValueError(
        f"unknown projection feature {feature!r}; known: 'decode', 'aux', 'backbone', "
        "'backbone:<index>'"
    )


class Segmentor(nn.Module):
    """Images [B, H, W, 3] -> {"logits", "aux_logits", "embeddings"}.

    - "logits": [B, h, w, num_classes] float32, h, w the decode head's resolution (1/8
      of the image for ResNet-D8 + ASPP, 1/4 for HRNetV2, OCRNet and UperNet);
    - "aux_logits": [B, h', w', num_classes] float32 (h', w' of the auxiliary head's
      input: 1/8 on ResNet-D8 stage 3, 1/16 on Swin, 1/4 as OCRNet's first stage), or
      None without an auxiliary head;
    - "embeddings": [B, h, w, projection width] float32, resized bilinearly to the
      logits' resolution if the projected map has another one, or None without a
      projection head.

    The three keys are always present. Submodules are named `backbone`, `decode_head`,
    `aux_head` and `projection` (what `pretrained.load_backbone` expects). Every part
    computes in its own `dtype` (bfloat16 allowed); outputs are cast to float32. In
    training, dropout needs the 'dropout' rng and BatchNorm statistics are a mutable
    'batch_stats' collection, reduced over the global batch when the batch is sharded.
    """

    backbone: nn.Module
    decode_head: nn.Module
    aux_head: nn.Module | None = None
    projection: nn.Module | None = None
    projection_feature: str = "decode"
    cascade: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array | None]:
        if self.cascade and self.aux_head is None:
            raise ValueError("a cascade (OCRNet) needs an aux_head as its first stage")
        check_projection_feature(self.projection_feature)
        if self.projection_feature == "aux" and self.aux_head is None:
            raise ValueError("projection_feature='aux' needs an aux_head")

        features = self.backbone(images, train)
        aux_logits = aux_feats = None
        if self.aux_head is not None:
            aux_logits, aux_feats = self.aux_head(features, train)
        if self.cascade:
            logits, feats = self.decode_head(features, aux_logits, train)
        else:
            logits, feats = self.decode_head(features, train)

        embeddings = None
        if self.projection is not None:
            if self.projection_feature == "decode":
                source = feats
            elif self.projection_feature == "aux":
                source = aux_feats
            elif self.projection_feature == "backbone":
                source = select_inputs(features, tuple(range(len(features))))
            else:
                source = features[int(self.projection_feature.split(":")[1])]
            embeddings = self.projection(source, train)
            embeddings = resize(embeddings.astype(jnp.float32), logits.shape[1:3])

        def f32(x: jax.Array | None) -> jax.Array | None:
            return None if x is None else x.astype(jnp.float32)

        return {"logits": f32(logits), "aux_logits": f32(aux_logits), "embeddings": embeddings}
