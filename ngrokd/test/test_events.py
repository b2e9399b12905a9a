"""
Tests for L{ngrokd.events} (what changed between two status samples) and
L{ngrokd.control.feed} (the bounded, numbered feed of those changes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.control.feed import AT_ONCE, MAX_WAITERS, EventFeed
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
from ngrokd.status import FAILED, LISTENING, STARTING, EndpointStatus
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


def _order(row: EndpointStatus) -> tuple[str, str]:
    return (row.url, row.id)


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


class Rows:
    """
    Rows that say which of them changed, as the kept rows do.
    """

    def __init__(self) -> None:
        self.rows: dict[str, EndpointStatus] = {}
        self.watchers: list[Callable[[str], object]] = []

    def watch(self, watcher: Callable[[str], object]) -> None:
        self.watchers.append(watcher)

    def row(self, id: str) -> EndpointStatus | None:
        return self.rows.get(id)

    def set(self, *rows: EndpointStatus) -> None:
        new = {row.id: row for row in rows}
        changed = [id for id in {*self.rows, *new} if self.rows.get(id) != new.get(id)]
        self.rows = new
        for id in changed:
            for watcher in self.watchers:
                watcher(id)


_ROWS = st.builds(
    _row,
    id=st.sampled_from(["ep_1", "ep_2", "ep_3", "ep_4"]),
    url=st.sampled_from([DB, "http://a.prod", "http://b.prod", ""]),
    state=st.sampled_from([LISTENING, FAILED, STARTING]),
    reason=st.sampled_from(["", "last connection failed: refused", "in use"]),
    errors=st.integers(0, 3),
)


class FeedTests(SynchronousTestCase):
    """
    L{EventFeed}: sampled on a timer, numbered, bounded.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rows = Rows()
        self.feed = EventFeed(ready_status, self.rows, self.clock, interval=2.0, keep=5)
        self.feed.startService()
        self.addCleanup(self.feed.stopService)

    def test_sampledOnATimer(self) -> None:
        """
        A change is seen at the next sample, numbered from 1.
        """
        self.rows.set(_row())
        self.assertEqual(self.feed.after(0), [])
        self.clock.advance(2.0)
        (event,) = self.feed.after(0)
        self.assertEqual((event.id, event.kind, event.time), (1, ADDED, 2.0))

    @given(st.lists(st.lists(_ROWS, max_size=4), max_size=6))
    def test_sameEventsAsAComparisonOfEverything(
        self, samples: list[list[EndpointStatus]]
    ) -> None:
        """
        Told only which rows changed, each sample gives the events a
        comparison of every row with the previous sample's gives, in the
        same order.
        """
        rows, clock = Rows(), Clock()
        feed = EventFeed(ready_status, rows, clock, interval=2.0, keep=1000)
        feed.startService()
        before: dict[str, EndpointStatus] = {}
        for sample in samples:
            rows.set(*sorted({r.id: r for r in sample}.values(), key=_order))
            after = {row.id: row for row in sorted(rows.rows.values(), key=_order)}
            last = feed.last_id
            clock.advance(2.0)
            self.assertEqual(
                [Change(e.kind, e.url, e.message) for e in feed.after(last)],
                endpoint_changes(before, after),
            )
            before = after
        feed.stopService()

    def test_manyChangesInSlices(self) -> None:
        """
        Thousands of changed rows are compared L{AT_ONCE} at a time, a turn
        of the reactor between, and give every event in order.
        """
        rows, clock = Rows(), Clock()
        feed = EventFeed(ready_status, rows, clock, interval=2.0, keep=5000)
        feed.startService()
        rows.set(
            *(_row(id=f"ep_{n:04}", url=f"tcp://db{n:04}.x:1") for n in range(1200))
        )
        feed.sample()
        self.assertEqual(len(feed.after(0, limit=5000)), AT_ONCE)
        clock.advance(0)
        events = feed.after(0, limit=5000)
        self.assertEqual(len(events), 1200)
        self.assertEqual(events[-1].url, "tcp://db1199.x:1")
        feed.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bounded(self) -> None:
        """
        Only the newest events are kept.
        """
        for i in range(8):
            self.rows.set(_row(id=f"ep_{i}"))
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
        self.rows.set(_row())
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
