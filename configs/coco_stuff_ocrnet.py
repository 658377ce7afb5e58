"""OCRNet-HRNetV2-W48 + PNE on COCO-Stuff-164k (171 classes), 512x512 crops, batch 16.

    python main.py --config=configs/coco_stuff_ocrnet.py
The recipe (commands, hardware, expected results): pne_jax/configs/coco_stuff_ocrnet.py.
"""

from pne_jax.configs.coco_stuff_ocrnet import get_config  # noqa: F401
