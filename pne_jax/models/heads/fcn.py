"""The plain convolutional head (MMSegmentation's `FCNHead`).

`num_convs` conv + BN + ReLU layers of `kernel_size` to `channels` (zero: the input
itself, which then must have `channels` channels), optionally followed by a conv on the
concatenation of input and output (`concat_input`), then dropout and the 1x1 classifier.
Three uses in the paper's models:

- FCN-HRNetV2's decode head, and OCRNet's first (cascade) stage: all four branches
  upsampled to stride 4 and concatenated (`in_index=(0, 1, 2, 3)`), one 1x1 layer with
  `channels` = the sum of the branch widths, no concat, no dropout;
- the auxiliary head on stage 3 of ResNet/Swin: `in_index=2`, one 3x3 layer of 256
  channels, no concat, dropout 0.1 (loss weight 0.4 in MMSegmentation);
- FCN on ResNet-D8 (MMSegmentation's default): two 3x3 layers of 512, concat, dropout 0.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import Classifier, InIndex, select_inputs
from pne_jax.models.layers import ConvBNAct, Dtype


class FCNHead(nn.Module):
    """Backbone maps -> (logits [B, h, w, num_classes], features [B, h, w, channels]).

    h, w are those of the first selected map.
    """

    num_classes: int
    channels: int = 512
    num_convs: int = 2
    kernel_size: int = 3
    dilation: int = 1
    concat_input: bool = True
    dropout: float = 0.1
    in_index: InIndex = -1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        if self.num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {self.num_convs}")
        x = select_inputs(features, self.in_index)
        if self.num_convs == 0 and x.shape[-1] != self.channels:
            raise ValueError(
                f"num_convs=0 passes the input through: it has {x.shape[-1]} channels, "
                f"channels is {self.channels}"
            )
        feats = x
        for i in range(self.num_convs):
            feats = ConvBNAct(
                self.channels,
                self.kernel_size,
                dilation=self.dilation,
                dtype=self.dtype,
                name=f"convs_{i}",
            )(feats, train)
        if self.concat_input:
            feats = ConvBNAct(self.channels, self.kernel_size, dtype=self.dtype, name="conv_cat")(
                jnp.concatenate([x, feats], axis=-1), train
            )
        logits = Classifier(self.num_classes, self.dropout, name="cls")(feats, train)
        return logits, feats
