"""
Tests for L{ngrokd.servicetree}.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.servicetree import Parent, attach


class _Recorded(Service):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events
        self.stopped: Deferred[None] | None = None

    def startService(self) -> None:
        self.running = 1
        self.events.append(f"start {self.name}")

    def stopService(self) -> Deferred[None] | None:
        self.running = 0
        self.events.append(f"stop {self.name}")
        return self.stopped


class ServiceTreeTests(SynchronousTestCase):
    def test_attachToRunningParentStarts(self) -> None:
        """
        A child attached to a running parent starts at once; one attached
        before starts with the parent.
        """
        events: list[str] = []
        parent = Parent()
        attach(_Recorded("early", events), parent)
        parent.startService()
        attach(_Recorded("late", events), parent)
        self.assertEqual(events, ["start early", "start late"])

    def test_stopWaitsForChildren(self) -> None:
        """
        The parent's stop stops the children last attached first and fires
        only once each has finished stopping.
        """
        events: list[str] = []
        parent = Parent()
        first, second = _Recorded("first", events), _Recorded("second", events)
        first.stopped = Deferred()
        attach(first, parent)
        attach(second, parent)
        parent.startService()
        stopping = parent.stopService()
        self.assertEqual(events[2:], ["stop second", "stop first"])
        self.assertNoResult(stopping)
        first.stopped.callback(None)
        self.assertIsNone(self.successResultOf(stopping))
