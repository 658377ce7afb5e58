"""Demo: a tiny ResNet-V1c + ASPP with PNE on the synthetic dataset, on a laptop CPU.

    python main.py --config=configs/demo.py
The recipe (commands, hardware, expected results): pne_jax/configs/demo.py.
"""

from pne_jax.configs.demo import get_config  # noqa: F401
