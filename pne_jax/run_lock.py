"""One writer per workdir: an exclusive `flock` on `<workdir>/.pne_jax.lock`.

The lock file names its holder (pid, host, start time, command line) so that a second run
is refused with a message saying who to wait for. The kernel releases a flock when its
holder dies, even by SIGKILL, so a lock left behind is taken over at once (logged at info).
On a filesystem without flock support (ENOLCK, EOPNOTSUPP) the run continues unlocked,
with a warning. Only the standard library is imported: the CLIs can take the lock before
importing jax.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from types import TracebackType
from typing import Any

LOCK_FILE = ".pne_jax.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; `holder` is what it wrote."""

    def __init__(self, workdir: str, holder: dict[str, Any]):
        self.workdir, self.holder = workdir, holder
        super().__init__(
            f"workdir {workdir} is in use by {describe_holder(holder)}: wait for it, stop it, "
            "or pass another --workdir"
        )


def holder_record(now: datetime.datetime | None = None) -> dict[str, Any]:
    """What this process writes into the lock: pid, hostname, start time (UTC, ISO) and
    command line."""
    now = now or datetime.datetime.now(datetime.UTC)
    return {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "start_time": now.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 1234 on host h since 2026-12-02 13:40 UTC (python main.py ...)'; the parts the
    record lacks are left out."""
    text = f"pid {holder.get('pid', '?')}"
    if holder.get("hostname"):
        text += f" on host {holder['hostname']}"
    try:
        start = datetime.datetime.fromisoformat(str(holder["start_time"]))
        text += f" since {start.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    except (KeyError, ValueError):
        pass  # an old or partial record: the time is simply not shown
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _read_holder(fd: int) -> dict[str, Any]:
    """The record in the lock file open as `fd` ({} when empty or not JSON)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        holder = json.loads(data.decode("utf-8", "replace")) if data.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/.pne_jax.lock` exclusively (creating
    `workdir`), or raises WorkdirLockedError naming the live holder."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.locked = False
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock and writes this process's record into it."""
        if self._fd is not None:
            raise RuntimeError(f"WorkdirLock({self.workdir}) is already held by this object")
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLockedError(self.workdir, holder) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            logging.warning(
                "cannot lock %s (%s): the filesystem does not support flock; continuing "
                "unlocked, so make sure no other run uses this workdir",
                self.path,
                os.strerror(e.errno),
            )
            self._fd = fd
            self.locked = False
            self._write_record(fd)
            return
        previous = _read_holder(fd)
        if previous:
            logging.info(
                "took over the lock of %s: a previous holder (%s) left it without releasing it",
                self.workdir,
                describe_holder(previous),
            )
        self._fd = fd
        self.locked = True
        self._write_record(fd)

    @staticmethod
    def _write_record(fd: int) -> None:
        data = json.dumps(holder_record(), sort_keys=True).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def release(self) -> None:
        """Empties the record (a clean exit) and releases the lock; a no-op if not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            if self.locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self.locked = False
