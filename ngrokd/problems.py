# -*- test-case-name: ngrokd.test.test_problems -*-
"""
Problems that persist, said once, summarised rarely, shown until they clear.

A state file on a full disk, or a hosts file another process keeps locked,
fails again at every poll: one log line per poll is about 2,900 a day and
buries everything else, while nothing in C{ngrokctl status} says so. A
L{Problems} tracker logs a problem when it starts (and again when its reason
changes), then at most one summary line every L{SUMMARY_INTERVAL} seconds
while it lasts, and one line when it clears; L{Problems.current} is what
status shows meanwhile.
"""

from __future__ import annotations

import time

import attrs
from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Seconds between two summaries of one problem that goes on.
SUMMARY_INTERVAL = 3600.0


@frozen
class Problem:
    """
    Something that keeps failing: what, the latest reason, since when (the
    clock's seconds since the epoch), and how many times so far.
    """

    what: str
    error: str
    since: float
    count: int


def utc(seconds: float) -> str:
    """
    C{2025-01-02 03:04:05 UTC}: a time for a log line.
    """
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


class Problems:
    """
    The problems going on now, by what fails.
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, summary_interval: float = SUMMARY_INTERVAL
    ) -> None:
        self._clock = clock
        self._interval = summary_interval
        self._problems: dict[str, Problem] = {}
        #: When each problem was last said, in full or as a summary.
        self._said: dict[str, float] = {}

    def failed(self, what: str, error: str, effect: str) -> None:
        """
        C{what} failed (again) for C{error}; C{effect} says what that means
        for the user, in the first line.
        """
        now = self._clock.seconds()
        known = self._problems.get(what)
        if known is None or known.error != error:
            since = now if known is None else known.since
            count = 1 if known is None else known.count + 1
            self._problems[what] = Problem(what, error, since, count)
            self._said[what] = now
            self.log.error("{error}; {effect}", error=error, effect=effect, what=what)
            return
        known = self._problems[what] = attrs.evolve(known, count=known.count + 1)
        if now - self._said[what] >= self._interval:
            self._said[what] = now
            self.log.warn(
                "{what}: still failing, {count} times since {since}: {error}",
                what=what,
                count=known.count,
                since=utc(known.since),
                error=error,
            )

    def cleared(self, what: str) -> None:
        """
        C{what} worked: said once if it was failing.
        """
        known = self._problems.pop(what, None)
        if known is None:
            return
        del self._said[what]
        self.log.info(
            "{what} works again, after failing {count} times since {since}",
            what=what,
            count=known.count,
            since=utc(known.since),
        )

    def current(self) -> tuple[Problem, ...]:
        """
        The problems going on, oldest first.
        """
        return tuple(sorted(self._problems.values(), key=lambda p: p.since))
