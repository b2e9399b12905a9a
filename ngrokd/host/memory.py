# -*- test-case-name: ngrokd.test.test_memory -*-
"""
Giving memory back to the system after a storm of connections.

OpenSSL allocates each connection's TLS state with C{malloc}. When
thousands of connections close, glibc keeps what they freed in its heap for
later use, and the daemon's resident size stays at its peak: over 300 MB
after a burst of 5,000 connections, against about 60 MB idle.
C{malloc_trim} gives it back. L{MemoryTrimmer} looks every
L{CHECK_INTERVAL} seconds and trims, in a thread (on a large heap it takes
tens of milliseconds), when L{should_trim} says the storm has passed.

Before it trims, it runs the garbage collector. A closed connection's
objects (its protocols, transports, TLS connection and their C buffers)
refer to each other, so they are freed only by a full collection, and
Python starts one only after many new objects: a daemon left idle after a
storm would keep every connection of it (at 5,000 connections, over 60 MB)
until traffic came back. The collection runs on the reactor thread, once per
storm.

The other way round, glibc gives memory back too eagerly while data flows:
it trims the top of its heap whenever 128 KiB are free there, so the buffers
of bulk forwarding (128 KiB reads) shrink and regrow the heap, and every
regrowth faults in fresh zeroed pages, as much system CPU as the copying
saved. The service raises that threshold to L{TRIM_THRESHOLD} (and serves
allocations up to L{MMAP_THRESHOLD} from the heap), and leaves giving back to
the trims after a storm.

Only where the C library has C{malloc_trim} and C{mallopt} (glibc) and the
resident size can be read (Linux); elsewhere the service does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

#: Seconds between looks at the resident size.
CHECK_INTERVAL = 10.0
#: Trim once the resident size is this many times what it was after the
#: last trim (or at the first look).
GROWTH = 1.5

MiB = 2**20
#: Free bytes glibc keeps at the top of its heap before it trims by itself.
TRIM_THRESHOLD = 4 * MiB
#: Allocations from this size up get pages of their own.
MMAP_THRESHOLD = 1 * MiB
#: C{mallopt}'s parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def should_trim(
    resident: int, after_last_trim: int, open_now: int, open_peak: int
) -> bool:
    """
    Whether to trim now: the resident size grew by half since the last trim,
    and at most half the connections of the peak since then are still open,
    so that what the others freed can be given back (while they are all
    open, their memory is in use).
    """
    return resident >= GROWTH * after_last_trim and 2 * open_now <= open_peak


def resident_bytes() -> int | None:
    """
    This process's resident size, or C{None} where C{/proc} does not say.
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def glibc_malloc_trim() -> Callable[[], object] | None:
    """
    The C library's C{malloc_trim(0)}, or C{None} where it has none.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def glibc_keep_heap() -> bool:
    """
    Set glibc's thresholds to L{TRIM_THRESHOLD} and L{MMAP_THRESHOLD};
    whether it could be done.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )


class MemoryTrimmer(Service):
    """
    Trims the C heap when L{should_trim} says so, given the number of
    connections open now.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        connections_open: Callable[[], int],
        resident: Callable[[], int | None] = resident_bytes,
        trim: Callable[[], object] | None = None,
        interval: float = CHECK_INTERVAL,
        collect: Callable[[], object] = gc.collect,
    ) -> None:
        """
        @param reactor: trims in its thread pool; it must provide
            L{IReactorTime} too, which times the looks.
        @param trim: trims the heap; by default glibc's C{malloc_trim}, and
            then glibc's thresholds are set when started (L{glibc_keep_heap}).
        @param collect: frees what only the garbage collector can, before
            a trim.
        """
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._connections_open = connections_open
        self._resident = resident
        self._trim = trim
        self._interval = interval
        self._collect = collect
        self._tune = trim is None
        self._loop: LoopingCall | None = None
        self._after_last_trim: int | None = None
        self._open_peak = 0
        #: Trims done, and the bytes they gave back in all.
        self.trims = 0
        self.freed = 0

    def startService(self) -> None:
        Service.startService(self)
        if self._trim is None:
            self._trim = glibc_malloc_trim()
        if self._trim is None or self._resident() is None:
            self.log.debug("memory is not trimmed here: no malloc_trim or /proc")
            return
        if self._tune:
            glibc_keep_heap()
        self._loop = LoopingCall(self._look)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _look(self) -> Deferred[None] | None:
        resident = self._resident()
        open_now = self._connections_open()
        self._open_peak = max(self._open_peak, open_now)
        if resident is None:
            return None
        if self._after_last_trim is None:
            self._after_last_trim = resident
            return None
        if not should_trim(resident, self._after_last_trim, open_now, self._open_peak):
            return None
        trim = self._trim
        assert trim is not None
        collected = self._collect()
        pool = self._reactor.getThreadPool()
        trimming: Deferred[object] = deferToThreadPool(self._reactor, pool, trim)
        return trimming.addCallback(self._trimmed, resident, open_now, collected)

    def _trimmed(
        self, _: object, before: int, open_now: int, collected: object
    ) -> None:
        after = self._resident() or before
        self._after_last_trim = after
        self._open_peak = open_now
        self.trims += 1
        self.freed += max(0, before - after)
        self.log.info(
            "gave {freed} MiB back to the system ({before} MiB resident,"
            " now {after} MiB, {connections} connections open,"
            " {collected} unreachable objects collected)",
            freed=max(0, before - after) // MiB,
            before=before // MiB,
            after=after // MiB,
            connections=open_now,
            collected=collected,
        )
