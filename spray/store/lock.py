"""One run per job folder: an OS-level lock that a crashed run cannot leave behind.

``job_lock(folder)`` takes an exclusive ``flock`` on ``<folder>/.spray.lock`` for the length
of a block and writes who holds it (pid, host, start time, command) into the file. A second
process asking for the same folder gets :class:`JobBusyError` naming the holder (or waits,
with ``wait=True``). The kernel releases the lock when its process ends, however it ends,
so a lock left by a run killed with ``kill -9`` is simply taken over (and logged) by the next
run: there is no stale lock to clean up by hand.

The lock is re-entrant within one process (``spray correct`` holds it while its re-audit
runs ``run_audit`` on a folder inside the same job). ``flock`` is advisory and, on some
network filesystems, local to one machine: two machines sharing a job folder over NFS
should not run the same job at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".spray.lock"
_HELD: dict[Path, int] = {}
_HELD_GUARD = threading.Lock()


class JobBusyError(RuntimeError):
    """Another process is running a job in this folder; the message names it and the fix."""


def _holder(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder (empty when unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-...`` (or what is known of it)."""
    parts = [f"pid {holder['pid']}" if "pid" in holder else "an unknown process"]
    if holder.get("host"):
        parts.append(f"on host {holder['host']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return " ".join(parts)


def _acquire(fd: int, path: Path, wait: bool, timeout: float | None) -> None:
    """Take the exclusive lock on ``fd``, or raise JobBusyError naming its holder."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                holder = describe_holder(_holder(path))
                hint = "wait for it to finish, or run again with --wait" if not wait else f"it still ran after {timeout:g} s"
                raise JobBusyError(f"{path.parent}: another spray run is using this job folder ({holder}); {hint}.") from None
            time.sleep(0.2)


@contextlib.contextmanager
def job_lock(folder: Path, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold the job folder ``folder`` (created if missing) for the length of the block.

    ``wait``: block until the other run ends (at most ``timeout`` seconds, None: no limit)
    instead of raising :class:`JobBusyError` at once.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with _HELD_GUARD:
        if path in _HELD:
            _HELD[path] += 1
            held_here = True
        else:
            held_here = False
    if held_here:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, wait, timeout)
        previous = _holder(path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("%s: took over the lock of %s, which no longer runs", folder, describe_holder(previous))
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        with _HELD_GUARD:
            _HELD[path] = 1
        try:
            yield
        finally:
            with _HELD_GUARD:
                del _HELD[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
