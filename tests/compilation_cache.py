"""A persistent JAX compilation cache shared by the tests' subprocesses (main.py, pne-jax).

Each subprocess test runs the same tiny programs again (the demo's train step: a run of
tests/test_train.py's tiny command takes 33 s with a cold cache, 15 s with a warm one).
JAX's default thresholds apply: only programs that took over a second to compile are
stored, all of them at the start of a run, so a run killed later (the SIGKILL test) has
written its entries whole. Processes that run at the same time (the two-process test)
would race on one entry: they do not use it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

_DIRECTORY = tempfile.mkdtemp(prefix="pne-jax-tests-compilation-cache-")
atexit.register(shutil.rmtree, _DIRECTORY, ignore_errors=True)

ENV = {"JAX_COMPILATION_CACHE_DIR": _DIRECTORY}
"""Add to a subprocess's environment to share this session's cache."""
