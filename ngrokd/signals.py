# -*- test-case-name: ngrokd.test.test_datapath_abuse,ngrokd.test.test_stop_signals -*-
"""
SIGTERM and SIGINT, taken from the reactor: the first stops the daemon with
its grace for open connections, the next one ends that grace.

A service of its own, added only under twistd: a daemon run by a test or a
program of its own leaves the process's signals alone.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger


class Stoppable(Protocol):
    """
    What a second signal cuts short: the daemon's stop.
    """

    def stop_now(self) -> None: ...


class SignalReactor(Protocol):
    """
    The reactor, as far as signals use it. C{_exitSignal} is where the
    reactor keeps the signal it stopped for, which twistd ends by
    (checked by L{ngrokd.test.test_twisted_seams}).
    """

    running: bool
    _exitSignal: int | None

    def callFromThread(self, f: Callable[..., object], *args: object) -> None: ...

    def stop(self) -> None: ...

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., object]
    ) -> object: ...


class StopOnSignal(Service):
    """
    SIGTERM and SIGINT: the first stops the reactor, and so the daemon, with
    its grace for open connections; the next one ends that grace at once.

    The handlers only hand the signal to the reactor thread: nothing is
    logged and no lock is taken inside a handler, which runs in the middle
    of whatever the main thread was doing, a log line's write included. (The
    reactor's own handlers log there, and a second signal during that write
    can deadlock on the log file's lock.) They are installed as the service
    tree is prepared, before the reactor runs, so that a signal during the
    start still stops the daemon cleanly, and again right after the reactor
    puts its own SIGTERM handler in place as it starts. A signal in between
    (a few instructions, while nothing logs) meets the reactor's handler,
    which stops the reactor too: the stop asked for here then finds it
    stopping already.
    """

    log = Logger()

    def __init__(
        self,
        daemon: Stoppable,
        reactor: SignalReactor,
        install: Callable[[int, Any], object] = signal.signal,
    ) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self._install = install
        self._received = 0

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._install_handlers()
        if not self._reactor.running:
            # After the reactor's own trigger, which installs its handlers.
            self._reactor.addSystemEventTrigger(
                "during", "startup", self._install_handlers
            )

    def _install_handlers(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self._install(number, self._handler)

    def _handler(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.received, number)

    def received(self, number: int) -> None:
        """
        Act on signal C{number}, on the reactor thread.
        """
        self._received += 1
        name = signal.Signals(number).name
        if self._received == 1:
            self.log.info(
                "send {signal} again to reset open connections at once",
                signal=name,
            )
            # twistd ends by the signal the reactor keeps here (where its own
            # handlers keep theirs), as systemd expects.
            if self._reactor._exitSignal is None:
                self._reactor._exitSignal = number
            self._reactor.callFromThread(self._stop_reactor)
        else:
            self.log.info(
                "received {signal} again: resetting open connections", signal=name
            )
            self._daemon.stop_now()

    def _stop_reactor(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already: the reactor's own handler took a signal
