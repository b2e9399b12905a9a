# -*- test-case-name: ngrokd.test.test_discovery -*-
"""
Polling the ngrok API for the bound endpoints.

A failed poll changes nothing that is being served: the last good list stays
in force, the failure is logged when its kind differs from the previous one
(not at every poll, and not because ngrok gave each answer a new operation
id; a failure that is not one of the API's, a fault of ngrokd, once with its
traceback), and the next poll backs off exponentially with jitter, up to a cap,
honouring C{Retry-After}. The first success returns to the normal interval.
The next poll is scheduled only once the previous result has been applied,
so a slow reconcile never overlaps the next poll.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.ngrok.apierrors import EXPECTED_FAILURES, failure_kind
from ngrokd.retry import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    backoff_delay,
)

_T = TypeVar("_T")


class EndpointDiscoveryService(Service, Generic[_T]):
    """
    Calls C{fetch} every C{interval} seconds and hands each good result to
    C{deliver} (which may return a Deferred: the next poll waits for it).
    """

    log = Logger()

    def __init__(
        self,
        fetch: Callable[[], Deferred[_T]],
        deliver: Callable[[_T], object],
        clock: IReactorTime,
        interval: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._fetch = fetch
        self._deliver = deliver
        self._clock = clock
        self.interval = interval
        self._jitter = jitter
        self._next: IDelayedCall | None = None
        self._polling: Deferred[object] | None = None
        self.failures = 0
        self.last_error = ""
        self._last_kind = ""
        self.last_success: float | None = None
        #: Told each poll's duration in seconds, and its error (C{None}: good).
        self.on_poll: Callable[[float, BaseException | None], object] | None = None
        self._poll_started = 0.0

    def startService(self) -> None:
        Service.startService(self)
        self._schedule(0)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._polling is not None:
            self._polling.cancel()
        return None

    @property
    def next_poll_at(self) -> float | None:
        """
        When the next poll starts (the clock's time), if one is scheduled.
        """
        if self._next is not None and self._next.active():
            return float(self._next.getTime())
        return None

    @property
    def polling(self) -> bool:
        return self._polling is not None

    def set_interval(self, seconds: float) -> None:
        """
        Use a new interval from now on; a wait already longer is cut short.
        """
        self.interval = seconds
        if self.failures == 0 and self._next is not None and self._next.active():
            remaining = self._next.getTime() - self._clock.seconds()
            if remaining > seconds:
                self._next.reset(seconds)

    def poll_now(self) -> None:
        """
        Poll at once (unless a poll is running), e.g. after registering.
        """
        if self.running and self._polling is None:
            self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = self._clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._next = None
        self._poll_started = self._clock.seconds()
        fetching: Deferred[_T] = maybeDeferred(self._fetch)
        polling = fetching.addCallbacks(self._succeeded, self._failed)
        self._polling = polling
        polling.addBoth(self._done)

    def _succeeded(self, result: _T) -> object:
        if self.failures:
            self.log.info(
                "the ngrok API answers again after {failures} failed polls",
                failures=self.failures,
            )
        self.failures = 0
        self.last_error = ""
        self._last_kind = ""
        self.last_success = self._clock.seconds()
        self._observe(None)
        return self._deliver(result)

    def _failed(self, failure: Failure) -> float | None:
        if not self.running:
            return None  # cancelled by stopService
        self._observe(failure.value)
        self.failures += 1
        error = failure.getErrorMessage()
        kind = failure_kind(failure.value)
        delay = self.retry_delay(getattr(failure.value, "retry_after", None))
        if kind != self._last_kind and failure.check(*EXPECTED_FAILURES):
            self.log.warn(
                "polling the bound endpoints failed: {error}; keeping the last"
                " known endpoints, next try in {delay:.1f}s",
                error=error,
                delay=delay,
            )
        elif kind != self._last_kind:
            self.log.failure(
                "polling the bound endpoints failed unexpectedly: {error}; keeping"
                " the last known endpoints, next try in {delay:.1f}s",
                failure,
                error=error,
                delay=delay,
            )
        self.last_error = error
        self._last_kind = kind
        return delay

    def _observe(self, error: BaseException | None) -> None:
        if self.on_poll is not None:
            self.on_poll(self._clock.seconds() - self._poll_started, error)

    def retry_delay(self, retry_after: float | None) -> float:
        """
        How long to wait after the current run of failures: never less than
        ngrok's C{Retry-After}.
        """
        delay = backoff_delay(
            self.failures,
            min(self.interval, FIRST_BACKOFF),
            max(self.interval, MAX_BACKOFF),
            self._jitter,
        )
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
        return delay

    def _done(self, delay: object) -> None:
        self._polling = None
        if not self.running:
            return  # stopped: a cancelled poll or reconcile is no failure
        if isinstance(delay, Failure):
            self.log.failure("applying the bound endpoints failed", delay)
        self._schedule(delay if isinstance(delay, float) else self.interval)
