"""WorkdirLock: one writer per workdir, across processes and within one, recovered after
SIGKILL; the lock module stays free of heavy imports."""

import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pne_jax import run_lock
from pne_jax.run_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(workdir):
    """A child process that takes the lock, prints whether jax got imported, and sleeps
    until killed."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        # By path, not through pne_jax/__init__.py (which imports the loss, hence jax):
        # what run_lock itself imports.
        spec = importlib.util.spec_from_file_location("run_lock", {run_lock.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        lock = module.WorkdirLock({str(workdir)!r}).__enter__()
        print("jax" in sys.modules, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, "--steps=3"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = child.stdout.readline().strip()
    assert line in ("True", "False"), f"the holder did not start: {line!r}"
    return child, line == "True"


def test_a_second_process_is_refused_with_the_holder_and_recovers_after_sigkill(tmp_path, caplog):
    workdir = tmp_path / "run"
    child, imported_jax = _holder(workdir)
    try:
        assert not imported_jax  # run_lock imports only the standard library
        with pytest.raises(WorkdirLockedError) as info:
            with WorkdirLock(str(workdir)):
                pass
        message = str(info.value)
        assert message.startswith(f"workdir {workdir} is in use by pid {child.pid} on host ")
        assert " UTC (" in message and "--steps=3)" in message
        assert message.endswith(": wait for it, stop it, or pass another --workdir")
        assert "\n" not in message and isinstance(info.value, RuntimeError)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with caplog.at_level(logging.INFO), WorkdirLock(str(workdir)) as lock:
        assert lock.locked
        record = json.loads((workdir / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
        assert {"hostname", "start_time", "command"} <= set(record)
    assert any(f"previous holder (pid {child.pid}" in r.getMessage() for r in caplog.records)


def test_the_same_process_twice_is_refused_and_release_lets_the_next_in(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getpid()} "):
            WorkdirLock(workdir).__enter__()
    with caplog.at_level(logging.INFO), WorkdirLock(workdir) as lock:
        assert lock.locked  # released cleanly: no 'previous holder' line
    assert not [r for r in caplog.records if "previous holder" in r.getMessage()]
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_an_unsupported_filesystem_continues_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)) as lock:
        assert not lock.locked
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "does not support flock; continuing unlocked" in line


def test_other_lock_errors_propagate(tmp_path, monkeypatch):
    def bad_fd(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", bad_fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        WorkdirLock(str(tmp_path)).__enter__()


def test_describe_holder_formats_the_record():
    holder = {
        "pid": 1234,
        "hostname": "h",
        "start_time": "2026-12-02T13:40:05+00:00",
        "command": "python main.py --workdir=/w",
    }
    assert run_lock.describe_holder(holder) == (
        "pid 1234 on host h since 2026-12-02 13:40 UTC (python main.py --workdir=/w)"
    )
    assert run_lock.describe_holder({}) == "pid ?"
