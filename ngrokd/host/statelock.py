# -*- test-case-name: ngrokd.test.test_statelock -*-
"""
One daemon per state directory.

Two daemons on the same state would share one link, one hosts-file section
and one set of allocations, and the stop of either would remove what the
other serves. So a daemon takes an exclusive lock on a file in the state
directory before it touches anything else, and holds it until it has
stopped; a second one refuses to start, naming the holder's pid. The lock
is C{flock}'s: the kernel drops it when its holder dies, even by kill -9,
so a stale lock file never blocks a start.
"""

from __future__ import annotations

import errno
import fcntl
import os

#: The lock file in the state directory; it holds the holder's pid.
LOCK_FILE = "ngrokd.lock"
_MODE = 0o644
_DIRECTORY_MODE = 0o755


class StateDirectoryLocked(Exception):
    """
    Another process holds the state directory's lock: its C{pid}, when the
    lock file names one.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid

    def __str__(self) -> str:
        holder = f"pid {self.pid}" if self.pid else "another process"
        return (
            f"another ngrokd ({holder}) holds {self.path}: one daemon per state"
            " directory; stop that one, or give this one another server.state_dir"
        )


class StateLockError(Exception):
    """
    The lock file could not be created or locked.
    """

    def __init__(self, path: str, cause: OSError) -> None:
        super().__init__(path, cause)
        self.path = path
        self.cause = cause

    def __str__(self) -> str:
        return f"cannot lock {self.path}: {self.cause.strerror or self.cause}"


class StateLock:
    """
    The lock on one state directory. Nothing happens until L{acquire}.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """
        Take the lock (creating the directory if needed) and write our pid
        into the file; a no-op when already held.

        @raise StateDirectoryLocked: another process holds it.
        @raise StateLockError: the file cannot be made or locked.
        """
        if self._fd is not None:
            return
        try:
            os.makedirs(self.state_dir, _DIRECTORY_MODE, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _MODE)
        except OSError as e:
            raise StateLockError(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirectoryLocked(self.path, pid) from None
            raise StateLockError(self.path, e) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise StateLockError(self.path, e) from e
        self._fd = fd

    def release(self) -> None:
        """
        Let another daemon have the state directory. The file stays: removing
        it could let two processes lock two different files of one name.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
