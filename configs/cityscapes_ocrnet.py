"""OCRNet-HRNetV2-W48 + PNE on Cityscapes, 512x1024 crops, batch 8 (cascade: FCN stage as aux).

    python main.py --config=configs/cityscapes_ocrnet.py
The recipe (commands, hardware, expected results): pne_jax/configs/cityscapes_ocrnet.py.
"""

from pne_jax.configs.cityscapes_ocrnet import get_config  # noqa: F401
