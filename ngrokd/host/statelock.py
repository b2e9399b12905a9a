# -*- test-case-name: ngrokd.test.test_statelock -*-
"""
One daemon per state directory.

Two daemons on the same state would share one link, one hosts-file section
and one set of allocations, and the stop of either would remove what the
other serves. So a daemon takes an exclusive lock on the state directory
itself before it touches anything else, and holds it until it has stopped;
a second one refuses to start, naming the holder's pid, which the holder
writes in a file there. The directory, not that file, is locked: a file
deleted while locked would let the next daemon create and lock a new one
of the same name. The lock is C{flock}'s: the kernel drops it when its
holder dies, even by kill -9, so nothing stale ever blocks a start.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ngrokd.readfile import read_regular

#: The file in the state directory that names the holder's pid.
LOCK_FILE = "ngrokd.lock"
_MODE = 0o644
_DIRECTORY_MODE = 0o755
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class StateDirectoryLocked(Exception):
    """
    Another process holds the lock on the state directory C{path}: its
    C{pid}, when the lock file names one.
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
    The state directory could not be made or locked, or the lock file
    written.
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
        Lock the state directory (creating it if needed) and write our pid
        into the lock file; a no-op when already held.

        @raise StateDirectoryLocked: another process holds it.
        @raise StateLockError: the directory cannot be made or locked, or
            the file written.
        """
        if self._fd is not None:
            return
        try:
            os.makedirs(self.state_dir, _DIRECTORY_MODE, exist_ok=True)
            fd = os.open(self.state_dir, _DIRECTORY_FLAGS)
        except OSError as e:
            raise StateLockError(self.state_dir, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirectoryLocked(self.state_dir, _read_pid(self.path))
            raise StateLockError(self.state_dir, e) from e
        try:
            _write_pid(self.path)
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


def _write_pid(path: str) -> None:
    # Not through a link: the daemon is root, and the state directory could
    # hold one to a file it must not truncate.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, _MODE)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _read_pid(path: str) -> int | None:
    try:
        data, _ = read_regular(path, 32)
    except OSError:
        return None
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
