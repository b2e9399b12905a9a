# -*- test-case-name: ngrokd.test.test_held -*-
"""
Long answers written in slices between the reactor's turns.

C{/metrics} and C{/status} of 10,000 endpoints take tens of milliseconds
to render: done at once, that is as long without a connection accepted or
carried. Instead the answer is made piece by piece by a generator over an
immutable snapshot (or over counters that only grow, which Prometheus reads
as they are), and written L{SLICE} seconds of work at a time, with a turn
of the reactor between; a client that reads slowly pauses the writing (the
request's transport is its consumer), and one that goes stops it.

Slices rather than a thread: rendering is pure Python, so a thread would
hold the same global interpreter lock the reactor needs, for up to the
interpreter's switch interval at a time, and it would need a copy of every
counter made on the reactor thread first; slices leave the reactor in
charge of when the work runs, and read the counters where they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import (
    CooperativeTask,
    Cooperator,
    TaskFinished,
    TaskStopped,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ngrokd.control.held import REQUESTS, HoldWatch

#: Seconds of work in one slice.
SLICE = 0.004


def _budget() -> Callable[[], bool]:
    ends = time.perf_counter() + SLICE
    return lambda: time.perf_counter() >= ends


def slicer(clock: IReactorTime) -> Cooperator:
    """
    A cooperator that runs its tasks L{SLICE} seconds at a time, the next
    slice at the next turn of C{clock}'s reactor.
    """
    return Cooperator(
        terminationPredicateFactory=_budget,
        scheduler=lambda work: clock.callLater(0, work),
    )


@implementer(IPushProducer)
class SlicedBody:
    """
    Writes the pieces of one answer to C{request}, then finishes it.
    """

    log = Logger()

    def __init__(
        self,
        request: Request,
        pieces: Iterable[bytes],
        slices: Cooperator,
        name: str,
        watch: HoldWatch = REQUESTS,
    ) -> None:
        self._request = request
        self._name = name
        self._watch = watch
        self._paused = False
        writing = self._write(iter(pieces))
        self._task: CooperativeTask[Iterator[None]] = slices.cooperate(writing)
        request.registerProducer(self, True)
        self._task.whenDone().addCallbacks(self._done, self._failed)
        request.notifyFinish().addErrback(self._gone)

    def _write(self, pieces: Iterator[bytes]) -> Iterator[None]:
        while True:
            with self._watch.timing(self._name):
                piece = next(pieces, None)
                if piece is None:
                    return
                self._request.write(piece)
            yield None

    def _done(self, _: object) -> None:
        self._request.unregisterProducer()
        self._request.finish()

    def _failed(self, failure: Failure) -> None:
        if failure.check(TaskStopped):
            return  # the client went
        self.log.failure("answering {name} failed", failure, name=self._name)
        self._request.unregisterProducer()
        self._request.loseConnection()

    def _gone(self, failure: Failure) -> None:
        self.stopProducing()

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            try:
                self._task.pause()
            except TaskFinished:
                pass

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            try:
                self._task.resume()
            except TaskFinished:
                pass

    def stopProducing(self) -> None:
        try:
            self._task.stop()
        except TaskFinished:
            pass


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """
    C{items} in lists of C{size} (the last one shorter).
    """
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
