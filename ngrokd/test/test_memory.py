"""
Tests for L{ngrokd.host.memory}: when the C heap is trimmed, that a trim
gives memory back to the system, and that the connections of a storm
through the devcloud's ingress are freed before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import weakref
from typing import Any

from twisted.internet.protocol import Factory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ngrokd.datapath.bridge import BridgeFactory, LocalProtocol
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host.memory import (
    CHECK_INTERVAL,
    MemoryTrimmer,
    MiB,
    glibc_keep_heap,
    glibc_malloc_trim,
    resident_bytes,
    should_trim,
)
from ngrokd.test.helpers import Echo, devcloud_ingress, exchange, listen, wait_until
from ngrokd.test.test_hosts import ThreadReactor


class ShouldTrimTests(SynchronousTestCase):
    """
    L{should_trim} waits for growth and for the storm to pass.
    """

    def test_grownAndPassed(self) -> None:
        """
        Grown by half, and most connections gone: trim.
        """
        self.assertTrue(should_trim(300 * MiB, 60 * MiB, 0, 5000))

    def test_stillOpen(self) -> None:
        """
        While the connections that made it grow are open, even if no more
        come, their memory is in use.
        """
        self.assertFalse(should_trim(300 * MiB, 60 * MiB, 5000, 5000))

    def test_notGrown(self) -> None:
        """
        Less than half again since the last trim is left alone.
        """
        self.assertFalse(should_trim(80 * MiB, 60 * MiB, 0, 5000))


class MemoryTrimmerTests(SynchronousTestCase):
    """
    L{MemoryTrimmer} trims in a thread after a storm, and only then.
    """

    def setUp(self) -> None:
        self.reactor = ThreadReactor()
        self.resident = [60 * MiB]
        self.open = [0]
        self.trimmed = 0
        self.trimmer = MemoryTrimmer(
            self.reactor, lambda: self.open[0], lambda: self.resident[0], self.trim
        )

    def trim(self) -> None:
        self.trimmed += 1
        self.resident[0] = 70 * MiB

    def look(self, resident: int, open_now: int) -> None:
        self.resident[0], self.open[0] = resident, open_now
        self.reactor.advance(CHECK_INTERVAL)

    def test_afterStorm(self) -> None:
        """
        A burst raises the resident size; while its connections stay open
        nothing is trimmed; once they close, the heap is trimmed once, and
        what it gave back is counted.
        """
        self.trimmer.startService()
        self.look(200 * MiB, 3000)
        self.look(300 * MiB, 5000)
        self.look(300 * MiB, 5000)
        self.assertEqual(self.trimmed, 0)
        self.look(300 * MiB, 0)
        self.assertEqual(self.trimmed, 1)
        self.assertEqual(self.trimmer.freed, 230 * MiB)
        self.look(75 * MiB, 0)
        self.assertEqual(self.trimmed, 1)

    def test_collectsBeforeTrim(self) -> None:
        """
        The garbage collector runs just before the trim, and only then.
        """
        calls: list[str] = []
        trimmer = MemoryTrimmer(
            self.reactor,
            lambda: self.open[0],
            lambda: self.resident[0],
            lambda: calls.append("trim"),
            collect=lambda: calls.append("collect"),
        )
        trimmer.startService()
        self.look(300 * MiB, 5000)
        self.assertEqual(calls, [])
        self.look(300 * MiB, 0)
        self.assertEqual(calls, ["collect", "trim"])

    def test_stopLeavesNoTimer(self) -> None:
        """
        A stopped trimmer looks no more.
        """
        self.trimmer.startService()
        self.trimmer.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_unavailable(self) -> None:
        """
        Where the resident size cannot be read, nothing is scheduled.
        """
        trimmer = MemoryTrimmer(self.reactor, lambda: 0, lambda: None, self.trim)
        trimmer.startService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        trimmer.stopService()


class RealTrimTests(SynchronousTestCase):
    """
    The C library's C{malloc_trim} gives freed heap memory back.
    """

    def test_givesBack(self) -> None:
        """
        Blocks malloc'ed, written and freed below one still in use stay
        resident until a trim, which gives them back.
        """
        trim = glibc_malloc_trim()
        if trim is None or resident_bytes() is None:
            raise SkipTest("no malloc_trim or no /proc here")
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = [libc.malloc(4096) for _ in range(16_000)]  # 64 MiB
        pin = libc.malloc(4096)  # keeps the freed blocks off the heap's top
        for block in blocks:
            ctypes.memset(block, 1, 4096)
        for block in blocks:
            libc.free(block)
        before = resident_bytes()
        trim()
        after = resident_bytes()
        libc.free(pin)
        assert before is not None and after is not None
        self.assertGreater(before - after, 32 * MiB)

    def test_keepHeap(self) -> None:
        """
        With glibc's thresholds raised, two megabytes of buffers of the size
        bulk forwarding uses, allocated, written and freed again and again,
        reuse the same pages: glibc no longer trims them after each round
        only to fault fresh zeroed pages in at the next.
        """
        if not glibc_keep_heap():
            raise SkipTest("no mallopt here")
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size = 100 * 1024

        def faults() -> int:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(50):
                blocks = [libc.malloc(size) for _ in range(20)]
                for block in blocks:
                    ctypes.memset(block, 1, size)
                for block in reversed(blocks):
                    libc.free(block)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults()
        self.assertLess(faults(), 500)


class StormOverTLSTests(TestCase):
    """
    Connections carried over real mutual TLS to the devcloud's ingress are
    freed once a storm has passed, though nothing else runs the collector.
    """

    timeout = 60

    async def test_closedConnectionsFreed(self) -> None:
        """
        Closed connections refer to themselves (protocols, transports, TLS),
        so only the collector frees them: the trimmer's look after the storm
        does, and none of them is left.
        """
        url = "tcp://echo.test:7"
        harness = devcloud_ingress(self)
        harness.cloud.add_endpoint(
            url, ("127.0.0.1", listen(Factory.forProtocol(Echo), self))
        )
        bridge = BridgeFactory(parse_endpoint_url(url), harness.connector, None)
        carried: list[weakref.ref[LocalProtocol]] = []
        build = bridge.buildProtocol

        def remembered(addr: Any) -> LocalProtocol:
            protocol = build(addr)
            carried.append(weakref.ref(protocol))
            return protocol

        bridge.buildProtocol = remembered  # type: ignore[method-assign]
        port = listen(bridge, self)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        reactor = ThreadReactor()
        resident = [60 * MiB]
        trimmer = MemoryTrimmer(
            reactor, lambda: len(bridge.connections), lambda: resident[0], lambda: None
        )
        trimmer.startService()
        self.addCleanup(trimmer.stopService)
        for n in range(5):
            client = await exchange(port, b"echo %d" % n)
            self.assertEqual(client.received, b"echo %d" % n)
        await wait_until(lambda: not bridge.connections, "the bridge's end")
        resident[0] = 300 * MiB
        reactor.advance(CHECK_INTERVAL)
        self.assertEqual(trimmer.trims, 1)
        self.assertEqual([ref() for ref in carried], [None] * 5)
