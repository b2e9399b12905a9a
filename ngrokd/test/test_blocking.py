"""
Tests for L{ngrokd.blocking}: work runs in the pool's own thread, in order,
and a stop waits for the work already given, with real threads on the real
reactor.
"""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import TestCase

from ngrokd.blocking import BlockingPool, PoolStopped


class BlockingPoolTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.pool = BlockingPool(IReactorFromThreads(reactor), "test-blocking")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        #: Set to let held work finish.
        self.release = threading.Event()
        self.addCleanup(self.release.set)

    def held(self) -> str:
        """
        Work that waits (boundedly) for L{release}; its thread's name.
        """
        self.release.wait(10)
        return threading.current_thread().name

    def test_offTheReactorThread(self) -> Deferred[None]:
        """
        The work runs in another thread than the reactor's, and its result
        arrives on the reactor's.
        """

        async def run() -> None:
            thread = await self.pool.run(threading.current_thread)
            self.assertIsNot(thread, threading.main_thread())
            self.assertIs(threading.current_thread(), threading.main_thread())

        return ensureDeferred(run())

    def test_inOrder(self) -> Deferred[None]:
        """
        Work runs in the order it was given, one at a time.
        """

        async def run() -> None:
            done: list[int] = []
            first = self.pool.run(self.held)
            rest = [self.pool.run(done.append, n) for n in range(5)]
            self.assertNoResult(first)
            self.assertEqual(done, [])
            self.release.set()
            await first
            for d in rest:
                await d
            self.assertEqual(done, [0, 1, 2, 3, 4])

        return ensureDeferred(run())

    def test_failure(self) -> Deferred[None]:
        """
        The work's exception fails its Deferred.
        """

        def broken() -> None:
            raise OSError(5, "Input/output error")

        async def run() -> None:
            with self.assertRaises(OSError):
                await self.pool.run(broken)

        return ensureDeferred(run())

    def test_stopWaitsForWork(self) -> Deferred[None]:
        """
        A stop waits for the work already given, even work whose caller
        gave up on it (a cancel does not stop a thread), then ends the
        thread.
        """

        async def run() -> None:
            working = self.pool.run(self.held)
            working.cancel()
            self.failureResultOf(working, CancelledError)
            stopping = self.pool.stop()
            self.assertNoResult(stopping)
            self.release.set()
            await stopping
            self.assertFalse(
                [t for t in threading.enumerate() if "test-blocking" in t.name]
            )

        return ensureDeferred(run())

    def test_stoppedTakesNoWork(self) -> Deferred[None]:
        """
        Once stopped, work fails with L{PoolStopped} instead of running;
        started again, the pool takes work again.
        """

        async def run() -> None:
            await self.pool.stop()
            ran: list[int] = []
            error = self.failureResultOf(
                self.pool.run(ran.append, 1), PoolStopped
            ).value
            self.assertEqual(str(error), "the test-blocking thread is not running")
            self.pool.start()
            await self.pool.run(ran.append, 2)
            self.assertEqual(ran, [2])

        return ensureDeferred(run())
