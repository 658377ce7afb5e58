"""DeepLabV3-R101-D8 + PNE on ADE20K (150 classes), 512x512 crops, batch 16.

    python main.py --config=configs/ade20k_deeplab.py
The recipe (commands, hardware, expected results): pne_jax/configs/ade20k_deeplab.py.
"""

from pne_jax.configs.ade20k_deeplab import get_config  # noqa: F401
