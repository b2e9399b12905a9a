# -*- test-case-name: ngrokd.test.test_events -*-
"""
The live feed of events: what C{ngrokctl events} follows.

Every few seconds the feed compares the daemon's status with the previous
sample (L{ngrokd.events}) and keeps what changed, numbered, in a bounded
buffer; readers ask for the events after the last one they saw, waiting a
bounded time for the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

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
    Samples the status and keeps the last L{KEEP} events.
    """

    def __init__(
        self,
        daemon_status: Callable[[], DaemonStatus],
        endpoint_status: Callable[[], Sequence[EndpointStatus]],
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        keep: int = KEEP,
    ) -> None:
        self._daemon_status = daemon_status
        self._endpoint_status = endpoint_status
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
        Compare the status now with the previous sample and keep what changed.
        """
        daemon = self._daemon_status()
        endpoints = {row.id: row for row in self._endpoint_status()}
        changes: list[Change] = []
        if self._daemon is not None:
            changes += daemon_changes(self._daemon, daemon)
        changes += endpoint_changes(self._endpoints, endpoints)
        self._daemon, self._endpoints = daemon, endpoints
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
