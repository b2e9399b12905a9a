# -*- test-case-name: ngrokd.test.test_failurelog -*-
"""
Events that may come in floods (failed connections, dropped DNS packets),
logged so that a flood stays readable.

A thousand events must not make a thousand log lines. The first event of a
kind is logged in full, at once; the next ones are counted, and at most
every L{SUMMARY_INTERVAL} seconds one line says how many more came and the
latest reason. A kind quiet for a whole interval is forgotten, so its next
event is logged in full again.

L{Summariser} decides (a pure value, driven by the time it is given);
L{SummaryLog} keeps the timer and leaves the wording of both lines to its
subclasses.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds between two summaries of one kind of event.
SUMMARY_INTERVAL = 5.0

#: (what the event concerns, kind of event)
Key = tuple[str, str]


@define
class _Window:
    since: float
    suppressed: int = 0
    reason: str = ""


@define
class Summary:
    """
    C{count} more events of C{key} since the last line, the latest for
    C{reason}.
    """

    key: Key
    count: int
    reason: str


@define
class Summariser:
    """
    Which events to log in full, and which to count into a summary.
    """

    interval: float = SUMMARY_INTERVAL
    _windows: dict[Key, _Window] = field(factory=dict)

    def occurred(self, key: Key, reason: str, now: float) -> bool:
        """
        An event of C{key} happened at C{now}: whether to log it in full.
        """
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(now)
            return True
        window.suppressed += 1
        window.reason = reason
        return False

    def due(self, now: float) -> list[Summary]:
        """
        The summaries to log at C{now}: one per kind with events counted
        and a full interval since its last line. Kinds quiet for a whole
        interval are forgotten.
        """
        summaries = []
        for key, window in list(self._windows.items()):
            if now - window.since < self.interval:
                continue
            if window.suppressed:
                summaries.append(Summary(key, window.suppressed, window.reason))
                self._windows[key] = _Window(now)
            else:
                del self._windows[key]
        return summaries

    def flush(self) -> list[Summary]:
        """
        Every count not yet summarised; everything is forgotten.
        """
        summaries = [
            Summary(key, window.suppressed, window.reason)
            for key, window in self._windows.items()
            if window.suppressed
        ]
        self._windows.clear()
        return summaries

    @property
    def pending(self) -> bool:
        return bool(self._windows)


class SummaryLog:
    """
    Logs events through a L{Summariser}, with a timer for the summaries
    while any kind is being counted: L{first} writes an event's full line,
    L{more} a summary's. L{stop} logs what is left.
    """

    def __init__(self, clock: IReactorTime, interval: float = SUMMARY_INTERVAL):
        self._clock = clock
        self._summariser = Summariser(interval)
        self._timer: IDelayedCall | None = None

    def first(self, key: Key, reason: str) -> None:
        raise NotImplementedError

    def more(self, summary: Summary) -> None:
        raise NotImplementedError

    def occurred(self, key: Key, reason: str) -> None:
        """
        An event of C{key} happened, for C{reason}.
        """
        if self._summariser.occurred(key, reason, self._clock.seconds()):
            self.first(key, reason)
        if self._timer is None:
            self._timer = self._clock.callLater(
                self._summariser.interval, self._summarise
            )

    def _summarise(self) -> None:
        self._timer = None
        self._write(self._summariser.due(self._clock.seconds()))
        if self._summariser.pending:
            self._timer = self._clock.callLater(
                self._summariser.interval, self._summarise
            )

    def stop(self) -> None:
        """
        Log the counts not yet summarised, and stop the timer.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write(self._summariser.flush())

    def _write(self, summaries: list[Summary]) -> None:
        for summary in summaries:
            self.more(summary)
