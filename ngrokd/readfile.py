# -*- test-case-name: ngrokd.test.test_readfile -*-
"""
Reading a file a person names (the config file, a CA bundle, C{config
edit}'s copy) without ever waiting on it.

A plain C{open()} of a FIFO waits for a writer, and a read of one (or of a
device) waits for data, as long as it takes: a thread doing either never
returns, and a process that joins its threads at exit never ends. So the
file is opened without blocking, checked to be a regular file before a
byte is read, and read up to a bound. And where even that could wait (a
hung network filesystem), L{in_own_thread} reads in a thread that nothing
waits for: not the reactor's pool, whose threads a stop joins.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure

_T = TypeVar("_T")

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


def in_own_thread(
    reactor: IReactorFromThreads,
    clock: IReactorTime,
    seconds: float,
    work: Callable[[], _T],
    late: Callable[[], Exception],
) -> Deferred[_T]:
    """
    Call C{work} in a daemon thread of its own, which neither a stop nor
    the process's exit waits for; the result, or C{late()} as the failure
    once C{seconds} have passed without one (the thread is then left to
    end when it can, and what it returns is dropped).
    """
    result: Deferred[_T] = Deferred()

    def run() -> None:
        try:
            value = work()
        except BaseException:
            failure = Failure()
            reactor.callFromThread(result.errback, failure)
        else:
            reactor.callFromThread(result.callback, value)

    def timed_out(failure: Failure) -> Failure:
        failure.trap(TimeoutError)
        return Failure(late())

    threading.Thread(target=run, name="ngrokd read", daemon=True).start()
    return result.addTimeout(seconds, clock).addErrback(timed_out)
