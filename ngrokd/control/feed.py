# -*- test-case-name: ngrokd.test.test_events -*-
"""
The live feed of events: what C{ngrokctl events} follows.

The kept status rows (L{ngrokd.board}) tell the feed which endpoints
changed; every few seconds it compares those rows alone, and the daemon's
summary, with what it saw before (L{ngrokd.events}), and keeps what
changed, numbered, in a bounded buffer. While nothing changes a sample
costs nothing per endpoint; thousands of changed rows are compared
L{AT_ONCE} at a time, with a turn of the reactor between. Readers ask for
the events after the last one they saw, waiting a bounded time for the
next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from ngrokd.events import Change, daemon_changes, endpoint_changes
from ngrokd.status import DaemonStatus, EndpointStatus

#: How often the status is sampled, in seconds.
SAMPLE_INTERVAL = 2.0
#: How many events are kept for late readers.
KEEP = 1000
#: How many readers may wait at once; more get an empty answer at once.
MAX_WAITERS = 64
#: Changed rows compared in one turn of the reactor.
AT_ONCE = 500


class WatchedRows(Protocol):
    """
    The kept rows, which say which of them changed.
    """

    def watch(self, watcher: Callable[[str], object]) -> None: ...
    def row(self, id: str) -> EndpointStatus | None: ...


@frozen
class Event:
    """
    A numbered change, with the clock's time it was seen.
    """

    id: int
    time: float
    kind: str
    url: str
    message: str


class EventFeed(Service):
    """
    Samples what changed and keeps the last L{KEEP} events.
    """

    def __init__(
        self,
        daemon_status: Callable[[], DaemonStatus],
        rows: WatchedRows,
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        keep: int = KEEP,
    ) -> None:
        self._daemon_status = daemon_status
        self._rows = rows
        #: The endpoints whose rows changed since the last sample.
        self._changed: dict[str, None] = {}
        rows.watch(self._changed.setdefault)
        #: Those of the sample under way, in the order their events come.
        self._comparing: list[str] = []
        self._more: IDelayedCall | None = None
        self._clock = clock
        self._interval = interval
        self._events: deque[Event] = deque(maxlen=keep)
        self._next_id = 1
        self._daemon: DaemonStatus | None = None
        self._endpoints: dict[str, EndpointStatus] = {}
        self._waiters: list[tuple[Deferred[None], IDelayedCall]] = []
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._more is not None and self._more.active():
            self._more.cancel()
        self._more = None
        waiters, self._waiters = self._waiters, []
        for waiting, timer in waiters:
            timer.cancel()
            waiting.callback(None)
        return None

    @property
    def last_id(self) -> int:
        """
        The id of the newest event (0 when there is none yet).
        """
        return self._next_id - 1

    def sample(self) -> None:
        """
        Compare the daemon's summary, and the rows that changed, with what
        the previous sample saw, and keep what changed.
        """
        daemon = self._daemon_status()
        changes: list[Change] = []
        if self._daemon is not None:
            changes += daemon_changes(self._daemon, daemon)
        self._daemon = daemon
        self._keep(changes)
        if self._changed and not self._comparing:
            self._comparing = self._in_order(list(self._changed))
            self._changed.clear()
            self._compare()

    def _in_order(self, ids: list[str]) -> list[str]:
        """
        The endpoints present by URL, then those gone: the order of their
        events.
        """
        present: list[tuple[str, str]] = []
        gone: list[tuple[str, str]] = []
        for id in ids:
            row = self._rows.row(id)
            if row is not None:
                present.append((row.url, id))
            elif (old := self._endpoints.get(id)) is not None:
                gone.append((old.url, id))
        return [id for _, id in sorted(present)] + [id for _, id in sorted(gone)]

    def _compare(self) -> None:
        """
        Compare the next L{AT_ONCE} changed rows with what was seen before.
        """
        self._more = None
        ids, self._comparing = self._comparing[:AT_ONCE], self._comparing[AT_ONCE:]
        before: dict[str, EndpointStatus] = {}
        after: dict[str, EndpointStatus] = {}
        for id in ids:
            old = self._endpoints.pop(id, None)
            if old is not None:
                before[id] = old
            row = self._rows.row(id)
            if row is not None:
                after[id] = self._endpoints[id] = row
        self._keep(endpoint_changes(before, after))
        if self._comparing and self.running:
            self._more = self._clock.callLater(0, self._compare)

    def _keep(self, changes: list[Change]) -> None:
        if not changes:
            return
        now = self._clock.seconds()
        for change in changes:
            self._events.append(
                Event(self._next_id, now, change.kind, change.url, change.message)
            )
            self._next_id += 1
        waiters, self._waiters = self._waiters, []
        for waiting, timer in waiters:
            timer.cancel()
            waiting.callback(None)

    def after(self, last_seen: int, limit: int = 500) -> list[Event]:
        """
        The kept events newer than C{last_seen}, oldest first, at most
        C{limit}.
        """
        found = [event for event in self._events if event.id > last_seen]
        return found[:limit]

    def wait(self, last_seen: int, timeout: float) -> Deferred[list[Event]]:
        """
        The events newer than C{last_seen}; when there are none yet, wait up
        to C{timeout} seconds for some (an empty list then).
        """
        ready = self.after(last_seen)
        if ready or not self.running or len(self._waiters) >= MAX_WAITERS:
            return succeed(ready)

        waiting: Deferred[None] = Deferred(self._forget)
        timer = self._clock.callLater(timeout, self._expire, waiting)
        self._waiters.append((waiting, timer))
        return waiting.addCallback(lambda _: self.after(last_seen))

    def _expire(self, waiting: Deferred[None]) -> None:
        self._forget(waiting)
        waiting.callback(None)

    def _forget(self, waiting: Deferred[Any]) -> None:
        for entry in self._waiters:
            if entry[0] is waiting:
                self._waiters.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return
