"""pne-jax: the Positive-Negative Equal contrastive loss for semantic segmentation, in JAX."""

from pne_jax.losses.pne import pne_loss

__all__ = ["pne_loss"]
__version__ = "0.2.0"
