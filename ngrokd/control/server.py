# -*- test-case-name: ngrokd.test.test_control -*-
"""
The control socket: C{ngrokctl} (AMP) and the original's scripts (one JSON
object per connection) on one UNIX socket.

A connection whose first byte is C{{} speaks the original's protocol: one
JSON request, one JSON line back, then the daemon closes. Anything else is
AMP (L{ngrokd.control.commands}). Both reach the daemon through one
L{Controller}, so they answer alike and check permissions alike.

The socket is made 0660 (L{ngrokd.control.address}); a socket left by a
dead daemon is replaced, but one where a live process answers is never
taken: the daemon then runs without a control socket and says so.

Each connection (L{ngrokd.control.connection}) is held to limits, so that
whoever may open the socket cannot take the daemon's memory or its file
descriptors; each closed for one is logged, a flood in a few lines
(L{ConnectionNotices}).
"""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorThreads,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.control.address import AddressError, ControlAddress, control_address
from ngrokd.control.connection import IDLE_TIMEOUT, ControlFactory
from ngrokd.control.controller import ControlledDaemon, Controller
from ngrokd.control.feed import EventFeed
from ngrokd.control.peer import Peer, peer_of
from ngrokd.summarylog import Summariser, Summary

#: How long a probe of an existing socket may take, in seconds.
PROBE_TIMEOUT = 2.0


class ConnectionNotices:
    """
    Why control connections were closed or turned away, logged so that a
    flood stays readable (L{Summariser}): the first of a kind at once; the
    others counted, and the count logged with the next of that kind at
    least an interval later, or at L{stop}.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, socket: str) -> None:
        self._clock = clock
        self._socket = socket
        self._summariser = Summariser()

    def closed(self, kind: str, reason: str) -> None:
        """
        A connection was closed, or turned away, for C{reason}.
        """
        now = self._clock.seconds()
        self._write(self._summariser.due(now))
        if self._summariser.occurred((self._socket, kind), reason, now):
            self.log.warn(
                "control socket {socket}: closed a connection that {reason}",
                socket=self._socket,
                reason=reason,
                kind=kind,
            )

    def stop(self) -> None:
        self._write(self._summariser.flush())

    def _write(self, summaries: list[Summary]) -> None:
        for summary in summaries:
            self.log.warn(
                "control socket {socket}: closed {count} more connections,"
                " the last one that {reason}",
                socket=self._socket,
                count=summary.count,
                reason=summary.reason,
                kind=summary.key[1],
            )


def transport_peer(transport: ITransport) -> Peer:
    """
    The peer of a UNIX socket transport.
    """
    return peer_of(transport.getHandle())  # type: ignore[attr-defined]


class ControlService(Service):
    """
    Listens on C{server.socket_path} while the daemon runs.

    @param reactor: listens there (L{IReactorUNIX}, or as the endpoint
        described says); it must provide L{IReactorTime} and
        L{IReactorThreads} too.
    """

    log = Logger()

    def __init__(
        self,
        daemon: ControlledDaemon,
        feed: EventFeed,
        reactor: IReactorCore,
        credentials: Callable[[Any], Peer] = transport_peer,
    ) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self._description = daemon.config.server.socket_path
        self.controller = Controller(daemon, feed, reactor, self._description)
        self._credentials = credentials
        self._clock = IReactorTime(reactor)
        self._notices = ConnectionNotices(self._clock, self._description)
        #: Seconds of silence after which a control connection is closed.
        self.idle_timeout = IDLE_TIMEOUT
        self._port: IListeningPort | None = None
        self._starting: Deferred[None] | None = None
        self._started: list[Deferred[None]] = []

    @property
    def listening(self) -> bool:
        return self._port is not None

    def whenListening(self) -> Deferred[None]:
        """
        Fires once the start is over (listening, or not, with the reason
        logged).
        """
        if self._starting is None or self._starting.called:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._started.append(waiting)
        return waiting

    def startService(self) -> None:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed_to_start)
        self._starting.addBoth(self._fire_started)

    def _failed_to_start(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("the control socket could not start", failure)

    def _fire_started(self, _: object) -> None:
        started, self._started = self._started, []
        for waiting in started:
            waiting.callback(None)

    async def _start(self) -> None:
        server = self._daemon.config.server
        admin_gid = await self._gid("server.admin_group", server.admin_group)
        socket_gid = await self._gid("server.socket_group", server.socket_group)
        self.controller.admin_gid = admin_gid
        try:
            address = control_address(self._description)
        except AddressError as e:
            self.log.error(
                "server.socket_path: {error}; ngrokctl will not reach this daemon",
                error=e,
            )
            return
        endpoint = await self._endpoint(address)
        if endpoint is None:
            return
        factory = ControlFactory(
            self.controller,
            lambda transport: self._credentials(transport),
            self._clock,
            self._notices.closed,
            self.idle_timeout,
        )
        try:
            self._port = await endpoint.listen(factory)
        except Exception as e:
            self.log.error(
                "cannot open the control socket {socket}: {error}; ngrokctl"
                " will not reach this daemon",
                socket=self._description,
                error=e,
            )
            return
        if socket_gid is not None and address.path:
            os.chown(address.path, -1, socket_gid)
        self.log.info("control socket on {socket}", socket=self._description)
        if address.tcp:
            self.log.warn(
                "the control socket {socket} is TCP, where the daemon cannot"
                " tell who connects: it answers reads only (status, list,"
                " events) and refuses set-api-key and reload; whoever can reach"
                " it can read the status. Make server.socket_path a UNIX socket"
                " to change the daemon with ngrokctl",
                socket=address.description,
            )
        elif address.mode & 0o007:
            self.log.warn(
                "the control socket {socket} has mode {mode:o}: every user of"
                " this machine may connect and read the status",
                socket=address.path,
                mode=address.mode,
            )

    async def _gid(self, key: str, name: str) -> int | None:
        if not name:
            return None
        try:
            threads = IReactorThreads(self._reactor)
            entry = await deferToThreadPool(
                threads, threads.getThreadPool(), grp.getgrnam, name
            )
        except KeyError:
            self.log.error(
                "{key}: there is no group named {name!r}; it is ignored",
                key=key,
                name=name,
            )
            return None
        gid: int = entry.gr_gid
        return gid

    async def _endpoint(self, address: ControlAddress) -> IStreamServerEndpoint | None:
        """
        The endpoint to listen on; for a path, after making sure no live
        process answers there (C{None} then, with the reason logged).
        """
        if not address.path:
            try:
                described: IStreamServerEndpoint = serverFromString(
                    self._reactor, address.description
                )
                return described
            except (ValueError, TypeError, KeyError) as e:
                self.log.error(
                    "server.socket_path {socket} is not an endpoint Twisted"
                    " knows ({error}); ngrokctl will not reach this daemon",
                    socket=address.description,
                    error=e,
                )
                return None
        path = address.path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return self._unix(address)
        if not stat.S_ISSOCK(mode):
            self.log.error(
                "{socket} exists and is not a socket: not replacing it; the"
                " control socket is off (check server.socket_path)",
                socket=path,
            )
            return None
        probe = UNIXClientEndpoint(self._reactor, path, timeout=PROBE_TIMEOUT)
        try:
            answered = await probe.connect(Factory.forProtocol(Protocol))
        except (ConnectError, OSError):
            os.unlink(path)  # left by a daemon that is gone
            return self._unix(address)
        answered.transport.loseConnection()
        self.log.error(
            "another process answers on {socket}: not taking its socket; the"
            " control socket is off (is another ngrokd running?)",
            socket=path,
        )
        return None

    def _unix(self, address: ControlAddress) -> UNIXServerEndpoint:
        return UNIXServerEndpoint(
            self._reactor,
            address.path,
            backlog=address.backlog,
            mode=address.mode,
            wantPID=False,
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._notices.stop()
        if self._starting is not None:
            self._starting.cancel()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        stopping: Deferred[None] = Deferred.fromCoroutine(_stop(port))
        return stopping


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()  # type: ignore[misc]
