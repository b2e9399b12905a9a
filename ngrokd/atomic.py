# -*- test-case-name: ngrokd.test.test_atomic -*-
"""
Durable, all-or-nothing file writes.

The key, certificate, operator id and allocation files must survive a crash
or a full disk at any moment: a reader sees the old content or the new
content, never a mix, an empty file, or a key readable by others for an
instant. So each write goes to a temporary file in the same directory (same
filesystem, so the rename is atomic), which gets its final mode before any
byte is written, is flushed and fsynced, and is renamed over the target; the
directory is fsynced last so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile


def read_if_exists(path: str) -> bytes | None:
    """
    The content of C{path}, or C{None} when there is no such file; other
    errors (permissions, I/O) are raised for the caller to judge.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class AtomicWriteError(OSError):
    """
    Writing C{path} failed at C{step}; the file at C{path} (if any) still holds
    its old content and no temporary file is left behind.
    """

    def __init__(self, path: str, step: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), path)
        self.path = path
        self.step = step

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.step}: {self.strerror}"


def write_atomic(
    path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """
    Replace the content of C{path} with C{data}, with permissions C{mode}
    (not subject to the umask), atomically and durably. C{owner}, a
    C{(uid, gid)} pair, is given to the new file before it replaces the old
    one, so a file rewritten by root keeps its owner and group.

    @raise AtomicWriteError: on any failure, naming C{path}.
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    step = "create a temporary file"
    try:
        fd, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    except OSError as e:
        raise AtomicWriteError(path, step, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None:
                step = "set its owner"
                os.fchown(f.fileno(), *owner)
            step = "set its mode"
            os.fchmod(f.fileno(), mode)
            step = "write"
            f.write(data)
            f.flush()
            step = "fsync"
            os.fsync(f.fileno())
        step = "rename into place"
        os.replace(temporary, path)
    except OSError as e:
        _remove_quietly(temporary)
        raise AtomicWriteError(path, step, e) from e
    try:
        _fsync_directory(directory)
    except OSError as e:
        raise AtomicWriteError(path, "fsync its directory", e) from e
    _remove_leftovers(directory, prefix)


def _remove_leftovers(directory: str, prefix: str) -> None:
    """
    Remove the temporary files of earlier writes of the same file that a
    kill left behind: each file has one writer at a time, so any other one
    is dead.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            _remove_quietly(os.path.join(directory, name))


def replace_durably(source: str, target: str) -> None:
    """
    Rename C{source} over C{target} (same directory) and make the rename
    survive a crash.

    @raise AtomicWriteError: naming C{target}.
    """
    try:
        os.replace(source, target)
    except OSError as e:
        raise AtomicWriteError(target, f"rename {source} into place", e) from e
    try:
        _fsync_directory(os.path.dirname(os.path.abspath(target)))
    except OSError as e:
        raise AtomicWriteError(target, "fsync its directory", e) from e


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    """
    Remove a temporary file after a failed write. A second failure here is
    not reported: the first one is, and it is the one the caller can act on.
    """
    try:
        os.unlink(path)
    except OSError:
        pass
