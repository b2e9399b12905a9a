# -*- test-case-name: ngrokd.test.test_dialqueue -*-
"""
A bound on the dials to the ingress in progress at once.

A burst of thousands of connections would otherwise start thousands of TLS
handshakes together: each one's timeout runs while it waits for the CPU, and
most of them time out. L{DialQueue} lets at most C{limit} dials run; the
others wait their turn, in order, with their connection's reading paused, and
give up after C{max_wait} seconds in the queue. A dial's own timeouts start
only when it leaves the queue.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class QueueTimeout(Exception):
    """
    A connection waited too long for its turn to dial.
    """


class DialQueue:
    """
    Admits at most C{limit} dials at once; each admitted one must be
    L{release}d once its dial has finished, well or not.

    The waiting turns give up in the order they came (each after the same
    C{max_wait}), so one timer, for the oldest, serves them all: a burst of
    thousands queues no timer of its own for each.
    """

    def __init__(self, clock: IReactorTime, limit: int, max_wait: float) -> None:
        self._clock = clock
        self.limit = limit
        self.max_wait = max_wait
        self.running = 0
        #: Each waiting turn with when it gives up; the order of arrival, in
        #: which turns that left early are skipped.
        self._waiting: dict[Deferred[None], float] = {}
        self._order: deque[Deferred[None]] = deque()
        #: Fires when the oldest waiting turn gives up, or earlier.
        self._expiry: IDelayedCall | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(self) -> Deferred[None]:
        """
        Fires when this dial may start, or fails with L{QueueTimeout} after
        C{max_wait} seconds in the queue. Cancelling it leaves the queue.
        """
        if self.try_acquire():
            admitted: Deferred[None] = Deferred()
            admitted.callback(None)
            return admitted

        turn: Deferred[None] = Deferred(self._leave)
        self._waiting[turn] = self._clock.seconds() + self.max_wait
        self._order.append(turn)
        if self._expiry is None:
            self._expiry = self._clock.callLater(self.max_wait, self._expire)
        return turn

    def try_acquire(self) -> bool:
        """
        Start a dial that may wait for nothing, if one may start now with
        nobody waiting; if this says yes, L{release} it when it has finished.
        """
        if self.running < self.limit and not self._waiting:
            self.running += 1
            return True
        return False

    def release(self) -> None:
        """
        A dial has finished: the next waiting one may start.
        """
        while self._order:
            turn = self._order.popleft()
            if self._waiting.pop(turn, None) is not None:
                self._settle()
                turn.callback(None)
                return
        self.running -= 1

    def _expire(self) -> None:
        """
        Fail the turns that have waited C{max_wait}, oldest first; wait for
        the next one to.
        """
        self._expiry = None
        now = self._clock.seconds()
        while self._order:
            turn = self._order[0]
            deadline = self._waiting.get(turn)
            if deadline is None:
                self._order.popleft()  # it left
            elif deadline > now:
                if self._expiry is not None:
                    self._expiry.cancel()  # one armed meanwhile, for a later turn
                self._expiry = self._clock.callLater(deadline - now, self._expire)
                return
            else:
                self._order.popleft()
                del self._waiting[turn]
                turn.errback(
                    QueueTimeout(
                        f"waited {self.max_wait:g} s for one of {self.limit} dials"
                        " to the ingress in progress"
                    )
                )
        self._settle()

    def _leave(self, turn: Deferred[None]) -> None:
        if self._waiting.pop(turn, None) is not None:
            self._settle()

    def _settle(self) -> None:
        """
        Nobody waits any more: no timer, and no turns that left, kept.
        """
        if self._waiting:
            return
        self._order.clear()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
