"""One run per training workdir: an advisory `fcntl` lock on DIR/gembed.lock held for the run's life.

The kernel drops the lock when the holder's process dies in any way (SIGKILL included), so a lock
is never stale; the file's text (`pid host`) only names the holder for the error message. Multi-host
runs take it on process 0 only (the others share the workdir with it by design).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket

from gembed.errors import GembedUserError

LOCK_FILE = "gembed.lock"


@contextlib.contextmanager
def hold(workdir: pathlib.Path, take: bool = True):
    """Holds DIR/gembed.lock while the block runs (nothing when `take` is False); a GembedUserError
    naming the holder's pid and host when another process holds it."""
    if not take:
        yield
        return
    path = pathlib.Path(workdir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            pid, host = (holder + ["?", "?"])[:2]
            raise GembedUserError(
                f"{path}: workdir is in use by another gembed run (pid {pid} on host {host}); "
                f"wait for it to end or choose another --workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock
