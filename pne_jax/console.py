"""What the commands print, and where everything else goes.

The console keeps to the run's report: pne-jax's own log lines (one per logged step, or a
progress bar on a terminal, evaluations as a short table, warnings and errors in one line).
Everything else (the config, the libraries' records: TensorFlow, tfds, absl, orbax, grain,
jax; tracebacks) goes to the run's log file, `<workdir>/run.log`. `--verbosity=1` (absl's
flag) brings the libraries' records back to the console as well.

Call `quiet_environment()` before TensorFlow or JAX are imported (environment variables
that their C++ loggers read once), then `setup(log_file, verbosity)`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
LOG_FILE_NAME = "run.log"
_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"


def quiet_environment() -> None:
    """Keeps TensorFlow's and XLA's C++ notices off the console; inherited by the data-loading
    worker processes. A value the user set is kept. TensorFlow only decodes data here, so
    its oneDNN float kernels (whose start-up notice TensorFlow 2.21 prints whatever the log
    level) are not used: they are turned off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def is_ours(record: logging.LogRecord) -> bool:
    """A record logged by pne-jax's code (its modules log through the root logger)."""
    return record.pathname.startswith(_PACKAGE_DIR) or record.name.startswith("pne_jax")


class _ConsoleFilter(logging.Filter):
    """pne-jax's records at INFO and above; with `show_libraries`, everyone's. Records marked
    `extra={"file_only": True}` (details: the config, per-class tables) stay off the console,
    and `extra={"progress": True}` ones while a progress bar shows the same thing."""

    def __init__(self, show_libraries: bool):
        super().__init__()
        self.show_libraries = show_libraries
        self.bar_active = False

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "progress", False) and self.bar_active:
            return False
        if getattr(record, "file_only", False) and not self.show_libraries:
            return False
        return self.show_libraries or (is_ours(record) and record.levelno >= logging.INFO)


class _ConsoleFormatter(logging.Formatter):
    """The bare message for INFO; 'warning: ...' / 'error: ...' above; no traceback (the
    log file has it)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return message


class _TqdmStream:
    """Writes through tqdm, so log lines do not break a progress bar."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


_state: dict[str, Any] = {"filter": None, "file_handler": None}


def setup(log_file: str | None = None, verbosity: int = 0) -> None:
    """Routes logging: the console (stderr) shows pne-jax's records (all records with
    `verbosity` >= 1); `log_file`, if given, gets every record at INFO and above (DEBUG
    with `verbosity` >= 1), with timestamps and tracebacks. Replaces absl's handler; may be
    called again to move the log file (e.g. once the workdir is known)."""
    root = logging.getLogger()
    from absl import logging as absl_logging

    absl_handler = absl_logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    for handler in list(root.handlers):
        if getattr(handler, "_pne_jax", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    console_filter = _ConsoleFilter(show_libraries=verbosity >= 1)
    console = logging.StreamHandler(_TqdmStream())
    console.addFilter(console_filter)
    console.setFormatter(_ConsoleFormatter())
    console._pne_jax = True  # type: ignore[attr-defined]
    root.addHandler(console)
    _state["filter"] = console_filter
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        file_handler._pne_jax = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
        _state["file_handler"] = file_handler
    logging.captureWarnings(True)  # the libraries' warnings.warn: to the log file


def log_file_path() -> str | None:
    handler = _state["file_handler"]
    return None if handler is None else handler.baseFilename


class Progress:
    """The training progress: a tqdm bar on a terminal (loss, img/s, ETA), nothing otherwise
    (the trainer's per-step log lines are the report then). `update` is host-side only."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None):
        enabled = sys.stderr.isatty() if enabled is None else enabled
        console_filter = _state["filter"]
        self._bar = None
        if enabled and console_filter is not None and not console_filter.show_libraries:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr
            )
            console_filter.bar_active = True

    def update(self, step: int, loss: float, images_per_second: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={loss:.4g} {images_per_second:.1f} img/s")
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if _state["filter"] is not None:
                _state["filter"].bar_active = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
