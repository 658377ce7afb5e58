"""The PNE projection head: pixel features -> embeddings for the contrastive loss.

As the paper's code (`con_layer` in its ASPP head): a 1x1 conv + BN + ReLU to `hidden`
channels, then a 1x1 conv with bias to `out` channels. No normalisation here: the PNE
loss normalises the embeddings itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pne_jax.models.layers import ConvBNAct, Dtype


class ProjectionHead(nn.Module):
    """[B, h, w, C] -> [B, h, w, out] (same spatial size, compute dtype `dtype`)."""

    hidden: int = 512
    out: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBNAct(self.hidden, 1, dtype=self.dtype, name="hidden")(x, train)
        return nn.Conv(self.out, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="out")(x)
