"""Decode heads (MMSegmentation semantics) and the PNE projection head.

Every decode head maps the backbone's list of maps to `(logits, features)`: the logits
and the feature map just before dropout and the classifier, which the projection head
may read. The OCR head also takes its cascade's first-stage logits.
"""

from pne_jax.models.heads.aspp import ASPPHead
from pne_jax.models.heads.fcn import FCNHead
from pne_jax.models.heads.ocr import OCRHead
from pne_jax.models.heads.projection import ProjectionHead
from pne_jax.models.heads.uper import UPerHead

__all__ = ["ASPPHead", "FCNHead", "OCRHead", "ProjectionHead", "UPerHead"]
