"""
Tests for L{ngrokd.summarylog} and L{ngrokd.datapath.failurelog}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.failurelog import FailureLog
from ngrokd.summarylog import Summariser, Summary

DB = ("tcp://db.prod:5432", "DialFailed")
WEB = ("http://web.prod", "DialFailed")


class SummariserTests(SynchronousTestCase):
    """
    The first failure of a kind is logged, the rest counted and summarised.
    """

    def test_firstOfKindPerEndpoint(self) -> None:
        """
        The first failure of each kind for each endpoint is logged in full;
        repeats are not.
        """
        s = Summariser(5)
        self.assertTrue(s.occurred(DB, "refused", 0))
        self.assertFalse(s.occurred(DB, "refused", 1))
        self.assertTrue(s.occurred(WEB, "refused", 1))
        self.assertTrue(s.occurred((DB[0], "TLSFailed"), "bad certificate", 1))

    def test_summaryAtMostEveryInterval(self) -> None:
        """
        Repeats are summarised once a full interval has passed since the last
        line, with their count and the latest reason.
        """
        s = Summariser(5)
        s.occurred(DB, "refused", 0)
        for t in range(1, 312 + 1):
            s.occurred(DB, f"refused {t}", t / 100)
        self.assertEqual(s.due(4.9), [])
        self.assertEqual(s.due(5), [Summary(DB, 312, "refused 312")])
        self.assertEqual(s.due(10), [])

    def test_quietKindForgotten(self) -> None:
        """
        A kind quiet for a whole interval is forgotten: its next failure is
        logged in full again, and nothing is left to summarise.
        """
        s = Summariser(5)
        s.occurred(DB, "refused", 0)
        self.assertEqual(s.due(5), [])
        self.assertFalse(s.pending)
        self.assertTrue(s.occurred(DB, "refused", 6))

    def test_flush(self) -> None:
        """
        C{flush} gives every count not yet summarised and forgets all.
        """
        s = Summariser(5)
        s.occurred(DB, "refused", 0)
        s.occurred(DB, "refused", 1)
        s.occurred(WEB, "refused", 1)
        self.assertEqual(s.flush(), [Summary(DB, 1, "refused")])
        self.assertFalse(s.pending)


class FailureLogTests(SynchronousTestCase):
    """
    A flood of failures makes a bounded number of lines.
    """

    def test_floodLogsBoundedLines(self) -> None:
        """
        1,000 failures over 10 seconds make one full line and one summary
        per interval; stopping logs the rest and leaves no timer.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        clock = Clock()
        log = FailureLog(clock, interval=5)
        for _ in range(1000):
            log.failed(*DB, "ingress unreachable")
            clock.advance(0.01)
        log.stop()
        counts = [e.get("count") for e in events if e.get("url") == DB[0]]
        self.assertEqual(len(counts), 3)
        self.assertIsNone(counts[0])
        self.assertEqual(sum(counts[1:]), 999)
        self.assertEqual(clock.getDelayedCalls(), [])
