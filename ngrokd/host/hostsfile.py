# -*- test-case-name: ngrokd.test.test_hosts -*-
"""
Writing the ngrokd section of one hosts file (L{HostsFile}): under a lock,
atomically where it can and in place where the file is a mount point. The
original replaced the file's inode, losing its mode, owner and label, and
never updated it at all where it is a bind mount (fault 23).

Its methods block (on the lock and C{fsync}); L{ngrokd.host.hosts} runs
them off the reactor thread. What the section holds is decided by
L{ngrokd.host.hostsection}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Mapping

from twisted.logger import Logger

from ngrokd.host.hostsection import Addresses, pinned_names, render
from ngrokd.readfile import read_regular


class HostsFileError(Exception):
    """
    The hosts file could not be read or written.
    """

    def __init__(self, path: str, step: str, cause: OSError) -> None:
        super().__init__(path, step, cause)
        self.path = path
        self.step = step
        self.cause = cause

    def __str__(self) -> str:
        return f"cannot {self.step} {self.path}: {self.cause.strerror or self.cause}"


#: rename(2) fails so when the file is a mount point: Docker and Kubernetes
#: bind-mount /etc/hosts into containers.
_IN_PLACE_ERRORS = (errno.EBUSY, errno.EXDEV)
#: The most of the file a read for its names takes, in bytes.
MAX_READ = 64 * 2**20
#: Bounded retries when another writer replaces the file while we wait.
_LOCK_ATTEMPTS = 20
#: Seconds a write waits for the file's lock: any local user who can read
#: the file can hold a lock on it, and must not freeze the daemon.
LOCK_TIMEOUT = 10.0
#: Seconds between two tries for the lock.
_LOCK_POLL = 0.05


class HostsFile:
    """
    The ngrokd section of one hosts file. The methods block (on locks and
    C{fsync}): call them from a thread.

    Each call locks the file (C{flock}, shared with other cooperating
    writers; waiting at most C{lock_timeout} seconds for it), reads it
    afresh, and writes only if the section changes, so edits others make
    between two calls are kept. The new text replaces the
    file atomically, through a temporary file in the same directory that
    gets the file's mode, owner, group and extended attributes (such as its
    SELinux label). Where that cannot work (the file is a mount point, or
    its owner or attributes cannot be copied) it is rewritten in place. A
    symbolic link is followed: the file it names is written, the link kept.
    """

    log = Logger()

    def __init__(
        self, path: str, lock_timeout: float = LOCK_TIMEOUT, instance: str = ""
    ) -> None:
        self.path = path
        self.instance = instance
        self._in_place = False
        self._lock_timeout = lock_timeout

    def write(self, mapping: Mapping[str, Addresses]) -> bool:
        """
        Make the section hold exactly C{mapping} (no section if empty).

        @return: whether the file changed.
        @raise HostsFileError: naming the file and what failed.
        """
        path = os.path.realpath(self.path)
        fd = self._open_locked(path, create=bool(mapping))
        if fd is None:
            return False
        try:
            data = self._read(fd, path)
            old = data.decode("utf-8", "surrogateescape")
            new = render(old, mapping, self.instance).encode("utf-8", "surrogateescape")
            if new == data:
                return False
            if self._in_place or not self._replace(fd, path, new):
                self._write_in_place(fd, path, new)
            return True
        finally:
            os.close(fd)

    def remove(self) -> bool:
        """
        Remove the section, as on a clean stop.

        @return: whether the file changed.
        """
        return self.write({})

    def has_section(self) -> bool:
        """
        Whether the file seems to hold an ngrokd section, from a read that
        needs no write access and takes no lock: so that a daemon that never
        writes names (network mode, not root) need not open the file for
        writing. When the file cannot be read, C{True}: L{write} says why.
        """
        try:
            text = self._read_text()
        except HostsFileError:
            return True
        return render(text, {}, self.instance) != text

    def pinned(self) -> frozenset[str]:
        """
        The names the file sets outside this instance's section
        (L{pinned_names}), from a read that needs no write access and takes
        no lock. No file sets none.

        @raise HostsFileError: the file cannot be read.
        """
        return pinned_names(self._read_text(), self.instance)

    def _read_text(self) -> str:
        """
        The file's text (C{""} when there is no file), read so that a FIFO
        in its place cannot block the read (L{read_regular}).

        @raise HostsFileError: the file cannot be read, is not a file, or
            is larger than L{MAX_READ}.
        """
        try:
            data, _ = read_regular(self.path, MAX_READ + 1)
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise HostsFileError(self.path, "read", e) from e
        if len(data) > MAX_READ:
            raise HostsFileError(
                self.path,
                "read",
                OSError(errno.EFBIG, f"larger than {MAX_READ // 2**20} MiB"),
            )
        return data.decode("utf-8", "surrogateescape")

    def _open_locked(self, path: str, create: bool) -> int | None:
        """
        Open and lock the file that is at C{path} once the lock is held:
        another writer may have replaced it while we waited for the lock.
        """
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        deadline = time.monotonic() + self._lock_timeout
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError as e:
                if not create:
                    return None
                raise HostsFileError(path, "create", e) from e
            except OSError as e:
                raise HostsFileError(path, "open", e) from e
            try:
                if not _lock(fd, deadline):
                    raise BlockingIOError(
                        errno.EWOULDBLOCK,
                        "another process has held its lock for more than"
                        f" {self._lock_timeout:g}s",
                    )
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
            except OSError as e:
                os.close(fd)
                raise HostsFileError(path, "lock", e) from e
            os.close(fd)
        raise HostsFileError(
            path,
            "lock",
            OSError(errno.EAGAIN, f"replaced {_LOCK_ATTEMPTS} times while waiting"),
        )

    def _read(self, fd: int, path: str) -> bytes:
        chunks = []
        offset = 0
        try:
            while chunk := os.pread(fd, 65536, offset):
                chunks.append(chunk)
                offset += len(chunk)
        except OSError as e:
            raise HostsFileError(path, "read", e) from e
        return b"".join(chunks)

    def _replace(self, fd: int, path: str, data: bytes) -> bool:
        """
        Replace the file by a copy holding C{data}.

        @return: C{False} if the file must be written in place instead.
        """
        directory = os.path.dirname(path)
        try:
            tmp_fd, temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.ngrokd-", dir=directory
            )
        except OSError as e:
            self._fall_back(path, "create a temporary file beside", e)
            return False
        try:
            try:
                self._copy_attributes(fd, tmp_fd)
            except OSError as e:
                self._fall_back(path, "give a copy the owner and attributes of", e)
                return False
            step = "write"
            try:
                _write_all(tmp_fd, data)
                step = "fsync"
                os.fsync(tmp_fd)
                step = "rename over"
                os.rename(temporary, path)
            except OSError as e:
                if step == "rename over" and e.errno in _IN_PLACE_ERRORS:
                    self._fall_back(path, "rename over", e)
                    return False
                raise HostsFileError(path, f"{step} a copy of", e) from e
            temporary = ""
        finally:
            os.close(tmp_fd)
            if temporary:
                os.unlink(temporary)
        try:
            _fsync_directory(directory)
        except OSError as e:
            raise HostsFileError(directory, "fsync", e) from e
        return True

    @staticmethod
    def _copy_attributes(source: int, target: int) -> None:
        status = os.fstat(source)
        os.fchown(target, status.st_uid, status.st_gid)
        os.fchmod(target, status.st_mode & 0o7777)
        if not hasattr(os, "listxattr"):
            return  # macOS: Python has no xattr calls there, nor SELinux labels.
        try:
            names = os.listxattr(source)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            names = []
        for name in names:
            os.setxattr(target, name, os.getxattr(source, name))

    def _fall_back(self, path: str, step: str, error: OSError) -> None:
        self._in_place = True
        self.log.info(
            "cannot {step} {path} ({error}); writing it in place from now on",
            step=step,
            path=path,
            error=error.strerror,
        )

    def _write_in_place(self, fd: int, path: str, data: bytes) -> None:
        step = "write"
        try:
            _write_all(fd, data)
            step = "truncate"
            os.ftruncate(fd, len(data))
            step = "fsync"
            os.fsync(fd)
        except OSError as e:
            raise HostsFileError(path, f"{step} (in place)", e) from e


def _lock(fd: int, deadline: float) -> bool:
    """
    Lock C{fd} exclusively, trying until C{deadline} (of L{time.monotonic});
    whether it is locked.
    """
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(_LOCK_POLL)


def _write_all(fd: int, data: bytes) -> None:
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, data[offset:], offset)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
