"""pne-jax: the Positive-Negative Equal contrastive loss for semantic segmentation, in JAX."""

from pne_jax.losses.pne import pne_loss

__all__ = ["Segmenter", "pne_loss"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # Imported on first use: `pne_loss` alone needs only jax (the floor install has no flax).
    if name == "Segmenter":
        from pne_jax.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'pne_jax' has no attribute {name!r}")
