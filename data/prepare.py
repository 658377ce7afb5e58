"""Prepare a dataset once (later runs do nothing); the same as `pne-jax prepare`.

python -m data.prepare --dataset=cityscapes --manual_dir=DOWNLOADS --data_dir=~/tfds
python -m data.prepare --dataset=synthetic --data_dir=~/tfds   # no download
"""

import sys

from pne_jax import cli

if __name__ == "__main__":
    cli.run("prepare", sys.argv[1:], program="python -m data.prepare")
