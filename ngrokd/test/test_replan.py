"""
Tests for L{ngrokd.replan} through a daemon whose network pieces are in
memory: a poll that changes nothing decides nothing again and touches no
listener or row, a small change costs what it changed, and a large one is
applied in slices, the reactor turning between them.
"""

from __future__ import annotations

from typing import Any

from ngrokd import replan
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host import allocation
from ngrokd.ngrok.api import ApiEndpoint
from ngrokd.plan import plan
from ngrokd.test.test_daemon_net import ReconcileFixture


def _found(count: int, first: int = 0) -> list[ApiEndpoint]:
    return [
        ApiEndpoint(f"ep_{n}", f"tcp://h{n}.test:5432", "")
        for n in range(first, first + count)
    ]


class Counted:
    """
    A function, counting its calls.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.function(*args, **kwargs)


class ReplanTests(ReconcileFixture):
    """
    What a poll costs is what it changed.
    """

    def setUp(self) -> None:
        self.parse = Counted(parse_endpoint_url)
        self.plan = Counted(plan)
        self.allocate = Counted(allocation.allocate)
        self.patch(replan, "parse_endpoint_url", self.parse)
        self.patch(replan, "plan", self.plan)
        self.patch(allocation, "allocate", self.allocate)

    def apply(self, daemon: Any, found: list[ApiEndpoint]) -> None:
        self.applied(daemon.reconcile(found))

    def test_unchangedPollTouchesNothing(self) -> None:
        """
        Equal records again (new objects, as a poll makes them) parse no
        URL, decide no allocation or plan, bind nothing, and change no row:
        the daemon keeps its endpoints and plan as they were.
        """
        daemon = self.make_daemon("127.0.0.1")
        self.apply(daemon, _found(200))
        self.assertEqual(
            (self.parse.calls, self.plan.calls, self.allocate.calls), (200, 1, 1)
        )
        endpoints, plan, version = daemon.endpoints, daemon.plan, daemon.board.version
        del self.recorder.events[:]
        self.apply(daemon, _found(200))
        self.assertEqual(
            (self.parse.calls, self.plan.calls, self.allocate.calls), (200, 1, 1)
        )
        self.assertIs(daemon.endpoints, endpoints)
        self.assertIs(daemon.plan, plan)
        self.assertEqual(daemon.board.version, version)
        self.assertNotIn("listen", [event[0] for event in self.recorder.events])

    def test_smallChange(self) -> None:
        """
        One endpoint more parses one URL, binds one listener and makes one
        row.
        """
        daemon = self.make_daemon("127.0.0.1")
        self.apply(daemon, _found(200))
        version = daemon.board.version
        del self.recorder.events[:]
        self.apply(daemon, _found(201))
        self.assertEqual(self.parse.calls, 201)
        self.assertEqual(
            [event[0] for event in self.recorder.events].count("listen"), 1
        )
        # The row made, then made again as its listener listens.
        self.assertEqual(daemon.board.version, version + 2)
        self.assertEqual(len(daemon.endpoint_status()), 201)

    def test_largeChangeInSlices(self) -> None:
        """
        Two thousand new endpoints are parsed, their rows made and their
        listeners bound a slice at a time: what else the reactor has to do
        runs between the slices, and in the end all are served.
        """
        daemon = self.make_daemon("127.0.0.1")
        applied = daemon.reconcile(_found(2000))
        self.assertNoResult(applied)
        seen: list[int] = []
        self.reactor.callLater(0, lambda: seen.append(len(daemon.endpoints)))
        self.applied(applied)
        self.assertEqual(seen, [0])
        self.assertEqual(daemon.board.listeners_up, 2000)
        self.assertEqual(len(daemon.endpoint_status()), 2000)
