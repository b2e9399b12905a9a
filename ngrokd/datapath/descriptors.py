# -*- test-case-name: ngrokd.test.test_descriptors,ngrokd.test.test_datapath_abuse -*-
"""
File descriptors: the process's limit, the spares set aside for the ingress
legs of accepted connections, and accepting only when those are free.

Each carried connection holds two descriptors: the one accepted, and its leg
to the ingress, opened after the accept (at once, or when its turn to dial
comes). Were an accept to take the last free descriptor, the leg would fail
(C{EMFILE}) although the connection was accepted. So a listener accepts only
once L{DescriptorReserve} holds a spare descriptor for each connection
waiting for its leg, one for the connection about to be accepted, and
L{SPARE} more for what else the daemon opens meanwhile; a dial gives one
back just before it opens its socket. Otherwise the connection waits in the
kernel's backlog, and is accepted once descriptors are free.

The spares are sockets never connected: each is made and closed by one
system call, no I/O. L{AcceptGuard} is the listeners' side of it.
"""

from __future__ import annotations

import errno
import resource
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger

#: Descriptors kept beyond those owed to accepted connections.
SPARE = 8


class DescriptorReserve:
    """
    Spare descriptors, held until a dial needs one.
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, count: int) -> None:
        """
        Hold C{count} spares: close those beyond it, make those missing.

        @raise OSError: too few descriptors are free (C{EMFILE} or
            C{ENFILE}); the spares made until then stay held.
        """
        while len(self._held) > count:
            self._held.pop().close()
        while len(self._held) < count:
            self._held.append(socket.socket())

    def release(self) -> None:
        """
        A leg is about to open its socket: free a spare for it, if one is
        held.
        """
        if self._held:
            self._held.pop().close()

    def close(self) -> None:
        """
        Hold nothing any more.
        """
        self.hold(0)


#: Seconds a listener stops accepting when the process is out of file
#: descriptors; the connections waiting meanwhile stay in the backlog.
ACCEPT_BACKOFF = 0.1
#: Seconds of accepts without a pause before "accepting again" is said.
ACCEPTING_AGAIN_AFTER = 10.0


class AcceptGuard:
    """
    What every listener does when the process is short of file descriptors:
    accept only once a descriptor is set aside for the new connection's
    ingress leg (and one for each connection still waiting for its leg, and
    a few more: L{DescriptorReserve}); when that or the accept itself fails
    for want of descriptors, pause accepting for L{ACCEPT_BACKOFF} seconds,
    and say so once (with the limit) until accepts have worked for
    L{ACCEPTING_AGAIN_AFTER} seconds. (Twisted would instead accept and
    close every waiting connection, with a log line each.)
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        reserve: DescriptorReserve | None = None,
        owed: Callable[[], int] = lambda: 0,
    ) -> None:
        """
        @param reserve: the spares for ingress legs, none if C{None}.
        @param owed: how many accepted connections wait for their leg.
        """
        self.clock = clock
        self.exhausted = False
        self._reserve = reserve
        self._owed = owed
        self._last_pause = 0.0
        self._paused: dict[tcp.Port, IDelayedCall] = {}

    def watch(self, port: IListeningPort) -> None:
        """
        Guard the accepts of C{port} (a TCP port of the reactor's; others,
        as in tests, are left alone).
        """
        if isinstance(port, tcp.Port):
            port.socket = GuardedSocket(port.socket, port, self)

    def forget(self, port: IListeningPort) -> None:
        """
        C{port} stops listening: drop its pause.
        """
        paused = self._paused.pop(port, None)  # type: ignore[call-overload]
        if paused is not None:
            paused.cancel()

    def before_accept(self) -> None:
        """
        Set aside the descriptors an accept needs.

        @raise OSError: they are not free.
        """
        if self._reserve is not None:
            self._reserve.hold(self._owed() + 1 + SPARE)

    def out_of_files(self, port: tcp.Port, error: OSError) -> None:
        self._last_pause = self.clock.seconds()
        if not self.exhausted:
            self.exhausted = True
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            self.log.error(
                "cannot accept connections: {reason} (open-file limit {soft},"
                " hard limit {hard}); pausing accepts for {backoff} s at a"
                " time until descriptors are free",
                reason=error.strerror,
                soft=soft,
                hard=hard,
                backoff=ACCEPT_BACKOFF,
            )
        port.stopReading()
        if port not in self._paused:
            self._paused[port] = self.clock.callLater(
                ACCEPT_BACKOFF, self._resume, port
            )

    def _resume(self, port: tcp.Port) -> None:
        del self._paused[port]
        if port.connected and not port.disconnecting:
            port.startReading()

    def accepted(self) -> None:
        if not self.exhausted:
            return
        if self.clock.seconds() - self._last_pause >= ACCEPTING_AGAIN_AFTER:
            self.exhausted = False
            self.log.info("accepting connections again")


class GuardedSocket:
    """
    A listening socket that accepts only once the guard has set aside what
    the connection needs, and whose lack of descriptors, in that or in the
    accept, is reported to the guard and then looks to Twisted like an
    empty backlog.
    """

    def __init__(self, sock: socket.socket, port: tcp.Port, guard: AcceptGuard):
        self._socket = sock
        self._port = port
        self._guard = guard

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            self._guard.before_accept()
            accepted = self._socket.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._guard.out_of_files(self._port, e)
            raise BlockingIOError(errno.EAGAIN, "backing off") from None
        self._guard.accepted()
        return accepted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def raise_open_file_limit() -> tuple[int, int, int]:
    """
    Raise this process's soft limit on open files to its hard limit: every
    connection carried holds two. The soft limit before and after, and the
    hard limit (some systems refuse a soft limit that high: then it stays).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, hard, hard
