# -*- test-case-name: ngrokd.test.test_readfile -*-
"""
Reading a file a person names (the config file, a CA bundle, C{config
edit}'s copy) without ever waiting on it.

A plain C{open()} of a FIFO waits for a writer, and a read of one (or of a
device) waits for data, as long as it takes: a thread doing either never
returns, and a process that joins its threads at exit never ends. So the
file is opened without blocking, checked to be a regular file before a
byte is read, and read up to a bound.
"""

from __future__ import annotations

import errno
import os
import stat

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFile(OSError):
    """
    The path names something other than a regular file; C{strerror} says
    what.
    """


def read_regular(path: str, most: int) -> tuple[bytes, os.stat_result]:
    """
    Up to C{most} bytes of the regular file at C{path} (symbolic links
    followed), and its status (mode, owner) as of that read; read C{limit +
    1} to tell a file over C{limit} bytes.

    @raise NotRegularFile: C{path} is a FIFO, device, socket or directory.
    @raise OSError: it cannot be opened or read.
    """
    fd = os.open(path, _FLAGS)
    try:
        status = os.fstat(fd)
        mode = status.st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a file")
            raise NotRegularFile(errno.EINVAL, f"not a regular file but {kind}", path)
        chunks: list[bytes] = []
        left = most
        while left > 0:
            chunk = os.read(fd, min(left, 2**16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), status
    finally:
        os.close(fd)
