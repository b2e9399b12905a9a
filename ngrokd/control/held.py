# -*- test-case-name: ngrokd.test.test_held -*-
"""
How long a control request holds the reactor.

While the reactor thread renders an answer, no connection is accepted or
carried. Every request of the control surfaces (the health server's pages,
C{ngrokctl}'s commands) is timed where it runs on the reactor thread, each
slice of a long answer apart; one whose work takes over L{HOLD_LIMIT}
seconds of the thread's CPU time is logged as a warning naming the request
(with the wall time too), at most once a minute for each kind of request
(with how many times it happened since the last line). CPU time, not wall
time: on a busy machine the wall time of any work grows with the time the
system gives other processes, which nothing in ngrokd can change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twisted.logger import Logger

#: Seconds of the reactor's time a control request may take at once.
HOLD_LIMIT = 0.020
#: Seconds between two warnings about one kind of request.
WARN_INTERVAL = 60.0


class HoldWatch:
    """
    Times the work of control requests on the reactor thread.
    """

    log = Logger()

    def __init__(
        self,
        limit: float = HOLD_LIMIT,
        timer: Callable[[], float] = time.thread_time,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._limit = limit
        self._timer = timer
        self._clock = clock
        #: For each request, when it was last said and how often since.
        self._said: dict[str, tuple[float, int]] = {}

    @contextmanager
    def timing(self, request: str) -> Iterator[None]:
        """
        Time what runs inside, as work of C{request} (a fixed name, never
        text from the request).
        """
        started, began = self._timer(), self._clock()
        try:
            yield
        finally:
            used = self._timer() - started
            if used > self._limit:
                now = self._clock()
                self._held(request, used, now - began, now)

    def _held(self, request: str, seconds: float, wall: float, now: float) -> None:
        said, since = self._said.get(request, (None, 0))
        if said is not None and now - said < WARN_INTERVAL:
            self._said[request] = (said, since + 1)
            return
        self._said[request] = (now, 0)
        self.log.warn(
            "{request} held the reactor for {ms:.0f} ms (over {limit:.0f} ms;"
            " {wall:.0f} ms of wall time): no connection was accepted or"
            " carried meanwhile{more}",
            request=request,
            ms=seconds * 1000,
            wall=wall * 1000,
            limit=self._limit * 1000,
            more=f"; {since} more times since the last warning" if since else "",
        )


#: The watch every control surface of the process times its requests with.
REQUESTS = HoldWatch()
