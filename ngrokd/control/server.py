# -*- test-case-name: ngrokd.test.test_control -*-
"""
The control socket: C{ngrokctl} (AMP) and the original's scripts (one JSON
object per connection) on one UNIX socket.

A connection whose first byte is C{{} speaks the original's protocol: one
JSON request, one JSON line back, then the daemon closes. Anything else is
AMP (L{ngrokd.control.commands}). Both reach the daemon through one
L{Controller}, so they answer alike and check permissions alike.

The socket is made 0660; a socket left by a dead daemon is replaced, but
one where a live process answers is never taken: the daemon then runs
without a control socket and says so.
"""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ngrokd import __version__
from ngrokd.control.commands import (
    COMMANDS,
    PROTOCOL_VERSION,
    Events,
    Hello,
    ListEndpoints,
    Reload,
    SetAPIKey,
    Status,
)
from ngrokd.control.controller import Controller
from ngrokd.control.feed import EventFeed
from ngrokd.control.legacy import LegacyJSON
from ngrokd.control.peer import Peer, peer_of
from ngrokd.status import EndpointStatus

#: The longest a reader may wait for events in one call, in seconds.
MAX_EVENT_WAIT = 30.0
#: How long a control connection may stay silent, in seconds (ngrokctl's
#: longest wait between two calls is its events wait, under a minute).
IDLE_TIMEOUT = 120.0
#: How many control connections may be open at once.
MAX_CONNECTIONS = 64
#: How long a probe of an existing socket may take, in seconds.
PROBE_TIMEOUT = 2.0


class ControlAMP(amp.AMP):
    """
    The AMP side of a control connection.
    """

    def __init__(self, controller: Controller, peer: Peer | None) -> None:
        amp.AMP.__init__(self)
        self._controller = controller
        self._peer = peer
        #: The rows being listed, taken at the first page so that the
        #: pages of one listing agree.
        self._listing: tuple[EndpointStatus, ...] = ()

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's own, which logs every connection: ngrokctl makes one
        # per command, and health checks one every few seconds.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)

    @Hello.responder
    def hello(self, version: int) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "daemon_version": __version__,
            "commands": sorted(COMMANDS),
        }

    @Status.responder
    def status(self) -> dict[str, Any]:
        return {"status": self._controller.status()}

    @ListEndpoints.responder
    def list_endpoints(
        self, cursor: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        cursor = cursor or 0
        limit = limit or 1000
        if cursor == 0 or not self._listing:
            self._listing = self._controller.rows()
        rows = self._listing
        page = self._controller.page(rows, cursor, max(1, limit))
        answer: dict[str, Any] = {"endpoints": page}
        end = cursor + len(page)
        if end < len(rows):
            answer["next"] = end
        else:
            self._listing = ()
        return answer

    @Events.responder
    async def events(self, after: int, wait: float | None = None) -> dict[str, Any]:
        feed = self._controller.feed
        found = await feed.wait(after, min(max(wait or 0.0, 0.0), MAX_EVENT_WAIT))
        return {
            "events": [attrs.asdict(event) for event in found],
            "last": feed.last_id,
        }

    @Reload.responder
    async def reload(self) -> dict[str, Any]:
        return await self._controller.reload(self._peer)

    @SetAPIKey.responder
    async def set_api_key(self, key: str) -> dict[str, Any]:
        message = await self._controller.set_api_key(self._peer, key)
        return {"message": message}


class ControlFactory(Factory):
    """
    Makes control connections, at most L{MAX_CONNECTIONS} at once; each is
    closed after L{IDLE_TIMEOUT} seconds without a byte from its peer.
    """

    noisy = False

    def __init__(
        self,
        controller: Controller,
        credentials: Callable[[Any], Peer],
        clock: IReactorTime,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.controller = controller
        self.credentials = credentials
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.open = 0

    def buildProtocol(self, addr: object) -> Protocol | None:
        if self.open >= MAX_CONNECTIONS:
            return None  # refused: the peer sees the connection close
        return ControlProtocol(self)


class ControlProtocol(Protocol):
    """
    Picks the protocol from the first byte, then hands everything to it.
    """

    def __init__(self, factory: ControlFactory) -> None:
        self._factory = factory
        self._controller = factory.controller
        self._credentials = factory.credentials
        self._delegate: Protocol | None = None
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._factory.open += 1
        self._idle = self._factory.clock.callLater(
            self._factory.idle_timeout, self._timed_out
        )

    def _timed_out(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._factory.idle_timeout)
        if self._delegate is None:
            peer = self._peer()
            delegate: Protocol
            if data[:1] == b"{":
                delegate = LegacyJSON(self._controller, peer)
            else:
                delegate = ControlAMP(self._controller, peer)
            delegate.makeConnection(self.transport)
            self._delegate = delegate
        self._delegate.dataReceived(data)

    def _peer(self) -> Peer | None:
        try:
            return self._credentials(self.transport)
        except (OSError, AttributeError):
            return None  # not a UNIX socket: changes are refused

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.open -= 1
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._delegate is not None:
            self._delegate.connectionLost(reason)


def transport_peer(transport: ITransport) -> Peer:
    """
    The peer of a UNIX socket transport.
    """
    return peer_of(transport.getHandle())  # type: ignore[attr-defined]


class ControlService(Service):
    """
    Listens on C{server.socket_path} while the daemon runs.
    """

    log = Logger()

    def __init__(
        self,
        daemon: Any,
        feed: EventFeed,
        reactor: Any,
        credentials: Callable[[Any], Peer] = transport_peer,
    ) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self._description: str = daemon.config.server.socket_path
        self.controller = Controller(daemon, feed, reactor, self._description)
        self._credentials = credentials
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
        endpoint = await self._endpoint()
        if endpoint is None:
            return
        factory = ControlFactory(
            self.controller,
            lambda transport: self._credentials(transport),
            self._reactor,
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
        if socket_gid is not None and self._is_path:
            os.chown(self._description, -1, socket_gid)
        self.log.info("control socket on {socket}", socket=self._description)

    @property
    def _is_path(self) -> bool:
        return self._description.startswith("/")

    async def _gid(self, key: str, name: str) -> int | None:
        if not name:
            return None
        try:
            entry = await deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), grp.getgrnam, name
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

    async def _endpoint(self) -> Any:
        """
        The endpoint to listen on; for a path, after making sure no live
        process answers there (C{None} then, with the reason logged).
        """
        if not self._is_path:
            return serverFromString(self._reactor, self._description)
        path = self._description
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return self._unix(path)
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
            return self._unix(path)
        answered.transport.loseConnection()
        self.log.error(
            "another process answers on {socket}: not taking its socket; the"
            " control socket is off (is another ngrokd running?)",
            socket=path,
        )
        return None

    def _unix(self, path: str) -> UNIXServerEndpoint:
        return UNIXServerEndpoint(self._reactor, path, mode=0o660, wantPID=False)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._starting is not None:
            self._starting.cancel()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        stopping: Deferred[None] = Deferred.fromCoroutine(_stop(port))
        return stopping


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()  # type: ignore[misc]
