"""Train or evaluate a segmentation model with the PNE loss, from a checkout.

    python main.py --config=configs/cityscapes_deeplab.py --workdir=runs/cs_deeplab
    python main.py --config=configs/cityscapes_deeplab.py:80k --config.train.steps=100
    python main.py --config=configs/demo.py --mode=eval --workdir=runs/demo

`--mode` is train_and_eval (default), train or eval; `--config` also takes a shipped config by
name (`--config=demo`). The same as `pne-jax train|eval` (pne_jax/cli.py) of a pip install.
Multi-host: on TPU pods and Slurm/Open MPI clusters every process runs this same command and
`jax.distributed` finds its peers; elsewhere pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import sys

from pne_jax import cli

if __name__ == "__main__":
    cli.main_py(sys.argv)
