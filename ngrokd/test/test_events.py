"""
Tests for L{ngrokd.events} (what changed between two status samples) and
L{ngrokd.control.feed} (the bounded, numbered feed of those changes).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.control.feed import MAX_WAITERS, EventFeed
from ngrokd.events import (
    ADDED,
    CONNECTIONS_FAILED,
    FAILED_EVENT,
    IDENTITY,
    POLL_FAILING,
    POLL_RECOVERED,
    RECOVERED,
    REMOVED,
    Change,
    daemon_changes,
    endpoint_changes,
)
from ngrokd.status import FAILED, LISTENING, EndpointStatus
from ngrokd.test.helpers import ready_status

DB = "tcp://db.prod:5432"


def _row(**changes: Any) -> EndpointStatus:
    row = EndpointStatus(
        id="ep_1",
        url=DB,
        listen_address="10.107.0.2:5432",
        state=LISTENING,
        reason="",
        client_address="db.prod:5432",
    )
    return attrs.evolve(row, **changes)


class EndpointChangesTests(SynchronousTestCase):
    """
    L{endpoint_changes}.
    """

    def test_addedAndRemoved(self) -> None:
        """
        A new endpoint is added (and failed, when it starts failed); one
        that is gone is removed.
        """
        self.assertEqual(
            endpoint_changes({}, {"ep_1": _row()}),
            [Change(ADDED, DB, f"{DB} added: db.prod:5432")],
        )
        self.assertEqual(
            [c.kind for c in endpoint_changes({}, {"ep_1": _row(state=FAILED)})],
            [ADDED, FAILED_EVENT],
        )
        self.assertEqual(
            endpoint_changes({"ep_1": _row()}, {}),
            [Change(REMOVED, DB, f"{DB} removed")],
        )

    def test_failedAndRecovered(self) -> None:
        """
        A listening endpoint that fails says why; it recovers when it
        listens again.
        """
        failed = _row(state=FAILED, reason="port in use")
        self.assertEqual(
            endpoint_changes({"ep_1": _row()}, {"ep_1": failed}),
            [Change(FAILED_EVENT, DB, f"{DB} failed: port in use")],
        )
        self.assertEqual(
            [c.kind for c in endpoint_changes({"ep_1": failed}, {"ep_1": _row()})],
            [RECOVERED],
        )
        self.assertEqual(endpoint_changes({"ep_1": failed}, {"ep_1": failed}), [])

    def test_connectionFailuresSummarised(self) -> None:
        """
        Many failed connections between two samples are one event with the
        count and the last reason.
        """
        after = _row(errors=12, reason="last connection failed: ingress refused")
        self.assertEqual(
            endpoint_changes({"ep_1": _row(errors=0)}, {"ep_1": after}),
            [
                Change(
                    CONNECTIONS_FAILED,
                    DB,
                    f"12 connections to {DB} failed: ingress refused",
                )
            ],
        )


class DaemonChangesTests(SynchronousTestCase):
    """
    L{daemon_changes}.
    """

    def test_identityAndPolls(self) -> None:
        """
        The identity's new state is an event; so are polls starting and
        stopping to fail.
        """
        waiting = ready_status(identity_state="not registered", operator_id="")
        self.assertEqual(
            daemon_changes(waiting, ready_status()),
            [Change(IDENTITY, "", "registered")],
        )
        failing = ready_status(poll_error="503 from the API")
        self.assertEqual(
            [c.kind for c in daemon_changes(ready_status(), failing)], [POLL_FAILING]
        )
        self.assertEqual(
            [c.kind for c in daemon_changes(failing, ready_status())], [POLL_RECOVERED]
        )
        self.assertEqual(daemon_changes(failing, failing), [])


class FeedTests(SynchronousTestCase):
    """
    L{EventFeed}: sampled on a timer, numbered, bounded.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rows: list[EndpointStatus] = []
        self.feed = EventFeed(
            ready_status, lambda: self.rows, self.clock, interval=2.0, keep=5
        )
        self.feed.startService()
        self.addCleanup(self.feed.stopService)

    def test_sampledOnATimer(self) -> None:
        """
        A change is seen at the next sample, numbered from 1.
        """
        self.rows = [_row()]
        self.assertEqual(self.feed.after(0), [])
        self.clock.advance(2.0)
        (event,) = self.feed.after(0)
        self.assertEqual((event.id, event.kind, event.time), (1, ADDED, 2.0))

    def test_bounded(self) -> None:
        """
        Only the newest events are kept.
        """
        for i in range(8):
            self.rows = [_row(id=f"ep_{i}")]
            self.feed.sample()
        kept = self.feed.after(0)
        self.assertEqual(len(kept), 5)
        self.assertEqual(kept[-1].id, self.feed.last_id)

    def test_waitForTheNext(self) -> None:
        """
        A reader waiting for news gets the next event when it comes, and an
        empty list when its wait ends first.
        """
        waiting = self.feed.wait(0, 10.0)
        self.assertNoResult(waiting)
        self.rows = [_row()]
        self.clock.advance(2.0)
        self.assertEqual([e.kind for e in self.successResultOf(waiting)], [ADDED])
        idle = self.feed.wait(self.feed.last_id, 3.0)
        self.clock.advance(3.0)
        self.assertEqual(self.successResultOf(idle), [])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 6.0)

    def test_waitersBounded(self) -> None:
        """
        Beyond L{MAX_WAITERS} readers, a reader is answered at once.
        """
        waiting = [self.feed.wait(0, 30.0) for _ in range(MAX_WAITERS)]
        for d in waiting:
            self.assertNoResult(d)
        self.assertEqual(self.successResultOf(self.feed.wait(0, 30.0)), [])

    def test_stopAnswersWaiters(self) -> None:
        """
        Stopping answers every waiting reader and leaves no timer behind.
        """
        waiting = self.feed.wait(0, 30.0)
        self.feed.stopService()
        self.assertEqual(self.successResultOf(waiting), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
