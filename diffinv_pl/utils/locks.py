"""Per-sample locks so that two processes evaluating into one output directory never compute the same sample.

A lock is an advisory ``fcntl.flock`` on ``<output_dir>/locks/<key>.lock``. The kernel releases it when its holder
exits, however it exits (SIGKILL included), so a killed run never leaves a sample blocked: the next run simply takes
the lock. The holder re-checks that the sample's row does not exist after taking the lock, writes the row, removes
the lock file and releases it; a process that opened the removed file meanwhile takes its lock, sees the row and
skips. Locks are POSIX advisory locks: reliable on local disks; on network file systems they depend on the server.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def sample_lock(path: Path) -> Iterator[bool]:
    """Try to take the lock at ``path`` without waiting; yields True when taken (held until the block ends, then the
    file is removed), False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def sample_locked_elsewhere(path: Path) -> bool:
    """True when another process holds the lock at ``path`` now."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
