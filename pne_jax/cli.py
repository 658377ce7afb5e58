"""The command line: `pne-jax COMMAND [flags]`, or `python -m pne_jax COMMAND [flags]`.

    pne-jax train   --config=cityscapes_deeplab[:80k] [--workdir=DIR] [--config.train.steps=N]
    pne-jax eval    --config=cityscapes_deeplab --workdir=DIR [--config.eval.mode=slide]
    pne-jax predict --config=demo --workdir=DIR --images='photos/*.jpg' --out=DIR
    pne-jax prepare --dataset=cityscapes --manual_dir=DOWNLOADS --data_dir=~/tensorflow_datasets
    pne-jax convert --arch=resnet101c --checkpoint=model.safetensors --out=r101.npz

`--config` takes a shipped config by name (`pne_jax.configs.names()`) or the path of a config
file of your own, either with an optional `:arg`, and `--config.x=y` overrides. `train`
evaluates every `train.eval_every` steps and at the end (`--noeval_during_training`: never);
a checkout's `python main.py --mode=train_and_eval|train|eval` runs the same code. Flags are
defined only when a command runs, so importing this module defines none.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

try:
    from absl import app, flags, logging
except ImportError:  # a loss-only install: `main` says what to install
    app = flags = logging = None

COMMANDS = {
    "train": "train a config (evaluating on the way), resuming from the workdir's checkpoint",
    "eval": "evaluate a checkpoint of a workdir on the validation split",
    "predict": "predict image files with a checkpoint: label, colour and overlay PNGs",
    "prepare": "prepare a dataset (tfds ArrayRecord) from its downloads, once",
    "export": "export a model to run without pne-jax: StableHLO (jax alone), a TF SavedModel",
    "convert": "convert a checkpoint (timm, MMCV, MMSegmentation, Swin) into weights (.npz)",
}
MODES = ("train_and_eval", "train", "eval")
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def usage(program: str = "pne-jax") -> str:
    rows = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
    return (
        f"usage: {program} COMMAND [flags]   ({program} COMMAND --help for its flags)\n\n"
        f"commands:\n{rows}\n\n--config takes a shipped config "
        "(pne_jax.configs.names()) or a config file, each with an optional :arg."
    )


# --- --config: a shipped name or a path -----------------------------------------------------


def resolve_config_flag(argv: Sequence[str]) -> list[str]:
    """argv with `--config=NAME[:arg]` replaced by the shipped config's file, which is what
    ml_collections' config flag loads; a path is kept. Raises ValueError for an unknown name
    (listing the shipped ones) and FileNotFoundError for a missing file."""
    from pne_jax import configs

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            at, value, prefix = i, arg[len("--config=") :], "--config="
        elif arg == "--config" and i + 1 < len(out):
            at, value, prefix = i + 1, out[i + 1], ""
        else:
            continue
        path, config_arg = configs.resolve(value)
        out[at] = prefix + path + ("" if config_arg is None else f":{config_arg}")
    return out


def _config_name(flag_value: str) -> str:
    """`runs/<this>` is the default workdir: the config's name and its arg."""
    path, _, arg = flag_value.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}_{arg.replace(',', '_')}" if arg else name


# --- train / eval ---------------------------------------------------------------------------


def define_trainer_flags(*, mode_flag: bool) -> None:
    """Flags of `train`/`eval` (and of main.py, whose `--mode` picks between them)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "A shipped config name (e.g. demo, cityscapes_deeplab:80k) or a file."
    )
    flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
    if mode_flag:
        flags.DEFINE_enum("mode", "train_and_eval", list(MODES), "What to run.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (hosts).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
    flags.mark_flags_as_required(["config"])


def _on_cloud_tpu() -> bool:
    """A TPU VM (libtpu installed, TPU chips attached): jax.distributed then reads the slice's
    workers from the metadata server, on one host or many."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _use_distributed(f: flags.FlagValues) -> bool:
    if f.coordinator_address or (f.num_processes or 1) > 1 or _on_cloud_tpu():
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or any(k in os.environ for k in _CLUSTER_ENV)


def run_trainer(mode: str) -> None:
    """Runs `mode` (train_and_eval, train or eval) with the parsed trainer flags.

    The console shows the run's report (`pne_jax.console`); `<workdir>/run.log` has every
    record, the config and the traceback of an error, which the console shows in one line.
    """
    from pne_jax import console

    f = flags.FLAGS
    console.setup(None, f.verbosity)
    from pne_jax import datasets

    datasets.hide_accelerators_from_tf()  # TensorFlow only reads data
    import jax

    if _use_distributed(f):
        jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    from ml_collections import config_flags

    from pne_jax import train
    from pne_jax.configs import validation

    config = f.config
    workdir = f.workdir or os.path.join(
        "runs", _config_name(config_flags.get_config_filename(f["config"]))
    )
    try:
        validation.check(config)  # before anything is prepared, built or compiled
        if mode != "eval":
            train.make_workdir(workdir)
        if os.path.isdir(workdir) and os.access(workdir, os.W_OK):
            name = console.LOG_FILE_NAME  # run.log; other hosts of a pod: run.<i>.log
            if jax.process_index() > 0:
                name = name.replace(".log", f".{jax.process_index()}.log")
            console.setup(os.path.join(workdir, name), f.verbosity)
        if jax.process_index() == 0:
            log = console.log_file_path()
            logging.info("workdir: %s%s", os.path.abspath(workdir), f" (log: {log})" if log else "")
            logging.info("config:\n%s", config, extra={"file_only": True})
        train.prepare_data(config)
        if mode == "eval":
            train.evaluate_checkpoint(config, workdir)
            return
        results = train.train_and_evaluate(
            config, workdir, evaluate_during_training=mode == "train_and_eval"
        )
    except KeyboardInterrupt:
        logging.error("interrupted", exc_info=True)
        raise SystemExit(130) from None
    except Exception as e:  # one line on the console, the traceback in run.log
        logging.error("%s", e, exc_info=True)
        raise SystemExit(1) from None
    if results and jax.process_index() == 0:  # the command's result: on stdout
        print(
            f"validation mIoU {100 * results['miou']:.2f}  (workdir {workdir}: TensorBoard "
            "logs, metrics.jsonl, checkpoints/, run.log)",
            flush=True,
        )


def _trainer_main(mode_of: Callable[[], str]) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        run_trainer(mode_of())

    return main


def main_py(argv: Sequence[str]) -> None:
    """The checkout's `python main.py --config=... [--mode=...]`."""
    from pne_jax import console

    console.quiet_environment()
    define_trainer_flags(mode_flag=True)
    doc = "train a config and evaluate it (--mode=train_and_eval), only train, or only eval"
    _run(argv, _trainer_main(lambda: flags.FLAGS.mode), [__name__], doc)


# --- dispatch -------------------------------------------------------------------------------


def _help(program: str, doc: str, modules: Sequence[str]) -> str:
    text = "\n\n".join(filter(None, (flags.FLAGS.module_help(m) for m in modules)))
    if "config" in flags.FLAGS:
        text += "\n  --config.<field>=<value>: overrides a field, e.g. --config.train.steps=100"
    return f"usage: {program} [flags]\n\n{doc}\n\nflags:\n{text}"


def _run(
    argv: Sequence[str],
    main: Callable[[list[str]], None],
    flag_modules: Sequence[str],
    doc: str = "",
) -> None:
    """absl's app.run on argv, after `--config` names are resolved; `--help` lists the flags
    of `flag_modules` (absl's own lists only a script's)."""
    argv = list(argv)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(_help(argv[0], doc or (main.__doc__ or "").strip(), flag_modules))
        raise SystemExit(0)
    try:
        argv = resolve_config_flag(argv)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --config: {e}") from None
    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a `--config.x=y` override of a field the config lacks (or
    of the wrong type) reported in one line naming it, instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}\nPass --help to see the flags.") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {override_problem(argv) or e}") from None


def override_problem(argv: Sequence[str]) -> str | None:
    """The first `--config.<field>=value` of argv whose field the config does not have,
    described with the fields it does have."""
    from pne_jax import configs
    from pne_jax.configs import validation

    spec = next((a[len("--config=") :] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    config = configs.get_config(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].partition("=")[0].split(".")
        node, walked = config, []
        for key in path:
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                block = ".".join(["config", *walked])
                return f"{arg}: {validation.missing_field(block, key, fields)}"
            node, walked = node[key], [*walked, key]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """`pne-jax COMMAND [flags]` (the console script)."""
    if flags is None:
        raise SystemExit(
            "error: the pne-jax command needs the trainer's packages: pip install 'pne-jax[train]'"
        )
    from pne_jax import console

    console.quiet_environment()
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0]) if argv else "pne-jax"
    if program in ("__main__.py", "-c"):
        program = "python -m pne_jax"
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage(program))
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command, rest = argv[1], argv[2:]
    if command not in COMMANDS:
        raise SystemExit(
            f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}\n{usage(program)}"
        )
    run(command, rest, program=f"{program} {command}")


def run(command: str, args: Sequence[str], program: str | None = None) -> None:
    """Runs one of `COMMANDS` with its command-line `args` (`program` names it in messages)."""
    sub = [program or f"pne-jax {command}", *args]
    if command in ("train", "eval"):
        define_trainer_flags(mode_flag=False)
        if command == "train":
            flags.DEFINE_bool(
                "eval_during_training",
                True,
                "Evaluate every train.eval_every steps and at the end.",
            )

        def mode() -> str:
            if command == "eval":
                return "eval"
            return "train_and_eval" if flags.FLAGS.eval_during_training else "train"

        _run(sub, _trainer_main(mode), [__name__], COMMANDS[command])
    elif command == "predict":
        from pne_jax import predict

        predict.define_flags()
        _run(sub, predict.main, [predict.__name__], COMMANDS[command])
    elif command == "export":
        from pne_jax import export

        export.define_flags()
        _run(sub, export.main, [export.__name__], COMMANDS[command])
    elif command == "prepare":
        from pne_jax.datasets import preparation

        preparation.define_flags()
        _run(sub, preparation.main, [preparation.__name__], COMMANDS[command])
    elif command == "convert":  # argparse, with its own --help
        from pne_jax import pretrained

        pretrained.main(list(args), prog=sub[0])
    else:
        raise ValueError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
