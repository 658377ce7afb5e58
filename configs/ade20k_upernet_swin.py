"""UperNet-Swin + PNE on ADE20K (150 classes), 512x512 crops, batch 16, 160k steps.

    python main.py --config=configs/ade20k_upernet_swin.py
The recipe (commands, hardware, expected results): pne_jax/configs/ade20k_upernet_swin.py.
"""

from pne_jax.configs.ade20k_upernet_swin import get_config  # noqa: F401
