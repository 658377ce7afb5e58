"""Train or evaluate a segmentation model with the PNE loss.

    python main.py --config=configs/cityscapes_deeplab.py --workdir=runs/cs_deeplab
    python main.py --config=configs/cityscapes_deeplab.py:80k --config.train.steps=100
    python main.py --config=configs/demo.py --mode=eval --workdir=runs/demo

Multi-host: on TPU pods and Slurm/Open MPI clusters every process runs this same command and
`jax.distributed` finds its peers; elsewhere pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_MODE = flags.DEFINE_enum(
    "mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config"])

_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
)


def _on_cloud_tpu() -> bool:
    """A TPU VM (libtpu installed, TPU chips attached): jax.distributed then reads the slice's
    workers from the metadata server, on one host or many."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _use_distributed() -> bool:
    if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1 or _on_cloud_tpu():
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or any(k in os.environ for k in _CLUSTER_ENV if k != "TPU_WORKER_HOSTNAMES")


def _config_name(flag_value: str) -> str:
    path, _, arg = flag_value.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}_{arg.replace(',', '_')}" if arg else name


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from pne_jax import checkpoint, input_pipeline

    checkpoint.quiet_orbax_logs()  # the console keeps to the progress report

    input_pipeline.hide_accelerators_from_tf()  # TensorFlow only reads data
    import jax

    if _use_distributed():
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from pne_jax import train

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", _config_name(config_flags.get_config_filename(flags.FLAGS["config"]))
    )
    if jax.process_index() == 0:
        print(f"workdir: {os.path.abspath(workdir)}", flush=True)
        logging.info("config:\n%s", config)
    train.prepare_data(config)
    if _MODE.value == "eval":
        train.evaluate_checkpoint(config, workdir)
    else:
        results = train.train_and_evaluate(
            config, workdir, evaluate_during_training=_MODE.value == "train_and_eval"
        )
        if results and jax.process_index() == 0:
            print(
                f"validation mIoU {100 * results['miou']:.2f}  (workdir {workdir}: TensorBoard "
                "logs, metrics.jsonl, checkpoints/)",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
