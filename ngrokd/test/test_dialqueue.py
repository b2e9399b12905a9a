"""
Tests for L{ngrokd.datapath.dialqueue}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.dialqueue import DialQueue, QueueTimeout


class DialQueueTests(SynchronousTestCase):
    """
    At most C{limit} dials run; the rest wait in order, for a bounded time.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = DialQueue(self.clock, limit=2, max_wait=30)

    def test_admitsUpToLimit(self) -> None:
        """
        Dials up to the limit start at once; the next one waits.
        """
        first, second, third = (self.queue.acquire() for _ in range(3))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertNoResult(third)
        self.assertEqual((self.queue.running, self.queue.waiting), (2, 1))

    def test_releaseAdmitsInOrder(self) -> None:
        """
        Each finished dial lets the longest-waiting one start.
        """
        for _ in range(2):
            self.queue.acquire()
        third, fourth = self.queue.acquire(), self.queue.acquire()
        self.queue.release()
        self.successResultOf(third)
        self.assertNoResult(fourth)
        self.queue.release()
        self.successResultOf(fourth)
        self.queue.release()
        self.queue.release()
        self.assertEqual((self.queue.running, self.queue.waiting), (0, 0))

    def test_waitIsBounded(self) -> None:
        """
        A dial that waits C{max_wait} seconds fails with L{QueueTimeout} and
        leaves the queue; one that got its turn in time has no timer left.
        """
        for _ in range(2):
            self.queue.acquire()
        late, on_time = self.queue.acquire(), self.queue.acquire()
        self.clock.advance(10)
        self.queue.release()
        self.successResultOf(late)
        self.clock.advance(20)
        self.failureResultOf(on_time, QueueTimeout)
        self.assertEqual(self.queue.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelLeavesQueue(self) -> None:
        """
        A connection that goes away while waiting gives up its place: the
        next release goes to the one behind it, and no timer is left.
        """
        for _ in range(2):
            self.queue.acquire()
        gone, next_one = self.queue.acquire(), self.queue.acquire()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.queue.release()
        self.successResultOf(next_one)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eachWaitsItsOwnTime(self) -> None:
        """
        Each waiting dial gives up C{max_wait} seconds after it came, not
        when the one ahead of it does; one that left early changes nothing.
        """
        for _ in range(2):
            self.queue.acquire()
        first = self.queue.acquire()
        self.clock.advance(5)
        gone = self.queue.acquire()
        self.clock.advance(5)
        second = self.queue.acquire()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.clock.advance(20)
        self.failureResultOf(first, QueueTimeout)
        self.assertNoResult(second)
        self.clock.advance(9)
        self.assertNoResult(second)
        self.clock.advance(1)
        self.failureResultOf(second, QueueTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneTimerForABurst(self) -> None:
        """
        However many dials wait, the queue holds one timer for them.
        """
        turns = [self.queue.acquire() for _ in range(1000)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(30)
        for turn in turns[2:]:
            self.failureResultOf(turn, QueueTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])
