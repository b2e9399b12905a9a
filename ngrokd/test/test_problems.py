"""
Tests for L{ngrokd.problems}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.problems import SUMMARY_INTERVAL, Problem, Problems

DAY = 24 * 3600.0
POLL = 30.0


class ProblemsTests(SynchronousTestCase):
    """
    A problem is said once, summarised at most hourly, shown until it
    clears, and said when it clears.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.problems = Problems(self.clock)
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def fail_for(self, seconds: float, error: str = "cannot write f: full") -> int:
        """
        Fail at every poll for C{seconds}; the number of failures.
        """
        count = 0
        while count * POLL < seconds:
            self.problems.failed("saving f", error, "f is old")
            count += 1
            self.clock.advance(POLL)
        return count

    def test_aDayOfFailures(self) -> None:
        """
        A day of failures at every poll (2,880) is one line at the start and
        one every hour after it (the last failure is 23.99 hours in); status
        shows the problem, its count and since when.
        """
        start = self.clock.seconds()
        count = self.fail_for(DAY)
        self.assertEqual(count, 2880)
        lines = self.lines()
        self.assertEqual(len(lines), int(DAY / SUMMARY_INTERVAL))
        self.assertEqual(lines[0], "cannot write f: full; f is old")
        self.assertEqual(
            lines[1],
            "saving f: still failing, 121 times since 2023-11-14 22:13:20 UTC:"
            " cannot write f: full",
        )
        self.assertEqual(
            self.problems.current(),
            (Problem("saving f", "cannot write f: full", start, 2880),),
        )

    def test_cleared(self) -> None:
        """
        A problem that clears is said once and leaves status; clearing what
        did not fail says nothing.
        """
        self.problems.cleared("saving f")
        self.fail_for(90)
        self.problems.cleared("saving f")
        self.problems.cleared("saving f")
        self.assertEqual(
            self.lines()[1:],
            [
                "saving f works again, after failing 3 times since"
                " 2023-11-14 22:13:20 UTC"
            ],
        )
        self.assertEqual(self.problems.current(), ())

    def test_newReason(self) -> None:
        """
        A new reason for the same problem is said at once; it keeps its
        start and count.
        """
        start = self.clock.seconds()
        self.fail_for(60)
        self.fail_for(30, "cannot write f: read-only")
        self.assertEqual(
            self.lines(),
            ["cannot write f: full; f is old", "cannot write f: read-only; f is old"],
        )
        self.assertEqual(
            self.problems.current(),
            (Problem("saving f", "cannot write f: read-only", start, 3),),
        )
