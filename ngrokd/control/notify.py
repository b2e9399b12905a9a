# -*- test-case-name: ngrokd.test.test_notify -*-
"""
Tell systemd how the daemon does, over C{$NOTIFY_SOCKET} (C{Type=notify}).

The protocol is one datagram per message to a UNIX socket, C{KEY=value}
lines (sd_notify(3)); no library is needed. C{READY=1} goes once the daemon
is ready (as C{/readyz} means it), once it waits for an API key (a fresh
install has none, and systemd would otherwise time the start out and kill
a daemon that only waits for C{ngrokctl set-api-key}), or at the latest
L{START_WAIT} seconds after it started: the daemon retries what failed by
itself, so a restart would fix nothing and would take down the endpoints
that work. Its C{STATUS=} line then says what is missing.
C{STATUS=} lines follow the daemon's state when it changes, at most one a
second. C{WATCHDOG=1} goes at half of C{$WATCHDOG_USEC} from a reactor
timer, so that a reactor that stops turning stops the pings and systemd
restarts the daemon. C{STOPPING=1} goes when the daemon begins to stop.
Without C{$NOTIFY_SOCKET} the service does nothing.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ngrokd.ngrok.identity_service import WAITING_FOR_KEY
from ngrokd.status import DaemonStatus

#: Seconds between looks at the daemon's state: the most often a
#: C{STATUS=} line is sent.
STATUS_INTERVAL = 1.0
#: Seconds after which systemd is told the start is done, ready or not
#: (below systemd's default start timeout of 90 s).
START_WAIT = 30.0


def notify_address(value: str) -> str | None:
    """
    Where C{$NOTIFY_SOCKET} points: a path, or an abstract-namespace name
    (C{@name}, a leading NUL byte for the kernel); C{None} when unset or
    not a UNIX socket.
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between C{WATCHDOG=1} pings: half of C{$WATCHDOG_USEC}, when
    set for this process (C{$WATCHDOG_PID}, when given, names it).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


def wants_ready(status: DaemonStatus, waited: float) -> bool:
    """
    Whether systemd may consider the start done: the daemon is ready, it
    waits for an API key that only an operator can give, or it has tried
    for L{START_WAIT} seconds and retries the rest by itself.

    @param waited: seconds since the notifier started.
    """
    return (
        status.ready or status.identity_state == WAITING_FOR_KEY or waited >= START_WAIT
    )


def status_text(status: DaemonStatus) -> str:
    """
    The C{STATUS=} line: the state and the counts (read from the daemon's
    totals, so that a look costs the same with 10,000 endpoints).
    """
    counts = (
        f"{status.endpoints} endpoints,"
        f" {status.listeners_up} of {status.listeners_wanted} listeners up"
    )
    if status.ready:
        return f"ready: {counts}"
    return f"not ready: {status.not_ready_because}; {counts}"


class SystemdNotifier(Service):
    """
    Sends the sd_notify messages for one daemon.
    """

    log = Logger()

    def __init__(
        self,
        daemon_status: Callable[[], DaemonStatus],
        reactor: IReactorTime,
        environ: Mapping[str, str],
        pid: int,
    ) -> None:
        """
        @param environ: where C{NOTIFY_SOCKET}, C{WATCHDOG_USEC} and
            C{WATCHDOG_PID} are read (the process's environment under
            twistd).
        @param pid: this process's id, for C{WATCHDOG_PID}.
        """
        self._daemon_status = daemon_status
        self._reactor = reactor
        self._address = notify_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_every = watchdog_interval(environ, pid)
        self._socket: socket.socket | None = None
        self._ready = False
        self._status = ""
        self._failing = False
        self._loops: list[LoopingCall] = []
        self._started = 0.0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def startService(self) -> None:
        Service.startService(self)
        if self._address is None:
            return
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._started = self._reactor.seconds()
        self._start_loop(self._look, STATUS_INTERVAL)
        if self._watchdog_every is not None:
            self._start_loop(lambda: self.send("WATCHDOG=1"), self._watchdog_every)

    def _start_loop(self, call: Callable[[], None], every: float) -> None:
        loop = LoopingCall(call)
        loop.clock = self._reactor
        loop.start(every, now=True)
        self._loops.append(loop)

    def stopping(self) -> None:
        """
        The daemon begins to stop.
        """
        self.send("STOPPING=1")

    def stopService(self) -> None:
        Service.stopService(self)
        for loop in self._loops:
            loop.stop()
        self._loops = []
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _look(self) -> None:
        status = self._daemon_status()
        lines = []
        text = status_text(status)
        waited = self._reactor.seconds() - self._started
        if not self._ready and wants_ready(status, waited):
            self._ready = True
            lines.append("READY=1")
            if not status.ready:
                self.log.warn(
                    "telling systemd the start is done, not ready: {why}",
                    why=status.not_ready_because,
                )
        if text != self._status:
            self._status = text
            lines.append(f"STATUS={text}")
        if lines:
            self.send("\n".join(lines))

    def send(self, message: str) -> None:
        """
        Send one datagram; a full or missing socket is logged once, until
        a send works again, and never stops the daemon.
        """
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "cannot notify systemd at {address}: {error}",
                    address=self._address.replace("\0", "@"),
                    error=errno.errorcode.get(e.errno or 0, str(e)),
                )
            return
        self._failing = False
