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

`bn_momentum` (the weight of the old running statistics) is 0.9 as PyTorch's, except in
OCRNet's first stage: MMSegmentation's `CascadeEncoderDecoder` runs that head twice per
training step on the same batch, so its running statistics move as with 0.9^2 = 0.81
(`models.build_model` sets it; tests/test_mmseg_parity.py checks a training step).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.heads.decode_head import Classifier, InIndex, select_inputs
from pne_jax.models.layers import BN_MOMENTUM, ConvBNAct, Dtype


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
    bn_momentum: float = BN_MOMENTUM
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
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                name=f"convs_{i}",
            )(feats, train)
        if self.concat_input:
            feats = ConvBNAct(
                self.channels,
                self.kernel_size,
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                name="conv_cat",
            )(jnp.concatenate([x, feats], axis=-1), train)
        logits = Classifier(self.num_classes, self.dropout, name="cls")(feats, train)
        return logits, feats
