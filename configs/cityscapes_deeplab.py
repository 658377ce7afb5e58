"""DeepLabV3-R101-D8 + PNE on Cityscapes, 512x1024 crops, batch 8: the paper's main run.

    python main.py --config=configs/cityscapes_deeplab.py
The recipe (commands, hardware, expected results): pne_jax/configs/cityscapes_deeplab.py.
"""

from pne_jax.configs.cityscapes_deeplab import get_config  # noqa: F401
