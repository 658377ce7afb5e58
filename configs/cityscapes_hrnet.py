"""FCN-HRNetV2-W48 + PNE on Cityscapes, 512x1024 crops, batch 8.

    python main.py --config=configs/cityscapes_hrnet.py
The recipe (commands, hardware, expected results): pne_jax/configs/cityscapes_hrnet.py.
"""

from pne_jax.configs.cityscapes_hrnet import get_config  # noqa: F401
