"""
Tests for L{ngrokd.control.held} (a control request that holds the reactor
too long is said, naming it) and L{ngrokd.control.slices} (long answers
written between the reactor's turns).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, Cooperator
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.proto_helpers import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from ngrokd.control import held
from ngrokd.control.held import HOLD_LIMIT, WARN_INTERVAL, HoldWatch
from ngrokd.control.slices import SlicedBody
from ngrokd.test.helpers import wait_until
from ngrokd.test.test_health import DaemonHealthTestCase, http


class Ticks:
    """
    A timer that moves only when told.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HoldWatchTests(SynchronousTestCase):
    """
    L{HoldWatch}.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.ticks = Ticks()
        self.watch = HoldWatch(timer=self.ticks, clock=self.ticks)

    def hold(self, request: str, seconds: float) -> None:
        with self.watch.timing(request):
            self.ticks.now += seconds

    def warnings(self) -> list[str]:
        return [
            e["log_format"].format(**e)
            for e in self.events
            if e["log_level"] == LogLevel.warn
        ]

    def test_heldTooLong(self) -> None:
        """
        Work over the limit is said once, naming the request; again within
        a minute it is counted, and said with the count after the minute;
        work within the limit is not said.
        """
        self.hold("GET /metrics", HOLD_LIMIT / 2)
        self.assertEqual(self.warnings(), [])
        self.hold("GET /metrics", 0.035)
        (line,) = self.warnings()
        self.assertIn("GET /metrics held the reactor for 35 ms (over 20 ms;", line)
        self.hold("GET /metrics", 0.05)
        self.hold("GET /metrics", 0.05)
        self.hold("ngrokctl list", 0.05)
        self.assertEqual(len(self.warnings()), 2)
        self.ticks.now += WARN_INTERVAL
        self.hold("GET /metrics", 0.05)
        self.assertIn("2 more times since the last warning", self.warnings()[-1])


def _pieces(count: int, made: list[int]) -> Iterator[bytes]:
    for n in range(count):
        made.append(n)
        yield b"%d," % n


class _Request(DummyRequest):
    """
    A request that keeps its push producer (L{DummyRequest} pulls).
    """

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class SlicedBodyTests(SynchronousTestCase):
    """
    L{SlicedBody} writes a piece per slice here (a slice that ends at once).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.slices = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            # A turn a second: each advance is one turn.
            scheduler=lambda work: self.clock.callLater(1, work),
        )
        self.request = _Request([b""])
        self.as_request = cast(Request, self.request)
        self.made: list[int] = []

    def test_betweenTurns(self) -> None:
        """
        Nothing is made at once; each turn of the reactor makes one piece;
        the answer finishes after the last.
        """
        SlicedBody(self.as_request, _pieces(3, self.made), self.slices, "GET /x")
        self.assertEqual(self.made, [])
        self.clock.advance(1)
        self.assertEqual((self.made, self.request.written), ([0], [b"0,"]))
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(b"".join(self.request.written), b"0,1,2,")
        self.assertEqual(self.request.finished, 1)
        self.assertIsNone(self.request.producer)

    def test_pausedAndStopped(self) -> None:
        """
        While the client does not read nothing is made; once it is gone the
        rest is never made.
        """
        body = SlicedBody(
            self.as_request, _pieces(10, self.made), self.slices, "GET /x"
        )
        self.clock.advance(1)
        body.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(self.made, [0])
        body.resumeProducing()
        self.clock.advance(1)
        self.assertEqual(self.made, [0, 1])
        self.request.processingFailed(Failure(ConnectionError("gone")))
        for _ in range(10):
            self.clock.advance(1)
        self.assertEqual(self.made, [0, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RequestsTimedTests(DaemonHealthTestCase):
    """
    The health server's pages are timed as their requests.
    """

    def test_named(self) -> Deferred[None]:
        """
        With a limit of nothing, C{/status} and C{/metrics} are said by
        name.
        """

        async def run() -> None:
            events = EventLoggingObserver()
            globalLogPublisher.addObserver(events)
            self.addCleanup(globalLogPublisher.removeObserver, events)
            self.patch(held.REQUESTS, "_limit", -1.0)
            self.patch(held.REQUESTS, "_said", {})
            daemon = await self.start()
            for path in ("/status", "/metrics"):
                self.assertEqual((await http(self.url(daemon, path))).code, 200)
            await wait_until(
                lambda: (
                    {
                        e.get("request")
                        for e in events
                        if e["log_level"] == LogLevel.warn
                    }
                    >= {"GET /status", "GET /metrics"}
                ),
                "the warnings",
            )

        return ensureDeferred(run())
