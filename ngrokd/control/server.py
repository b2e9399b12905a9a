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
import json
import os
import stat
from collections.abc import Callable, Sequence
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
    PAGE_BYTES,
    PROTOCOL_VERSION,
    CommandFailed,
    Events,
    Hello,
    KeyRejected,
    ListEndpoints,
    NotPermitted,
    Reload,
    SetAPIKey,
    Status,
)
from ngrokd.control.configfile import store_api_key
from ngrokd.control.feed import EventFeed
from ngrokd.control.peer import Peer, may_change, peer_of, refusal
from ngrokd.endpoints import EndpointURLError, parse_endpoint_url
from ngrokd.ngrok.api import APIError, APIResponseInvalid, APIUnavailable, NoAPIKey
from ngrokd.ngrok.identity import IdentityError
from ngrokd.ngrok.identity_service import KeyRejected as OperatorNotInAccount
from ngrokd.status import EndpointStatus

#: The longest a reader may wait for events in one call, in seconds.
MAX_EVENT_WAIT = 30.0
#: The most a legacy JSON request may hold, in bytes.
MAX_LEGACY_REQUEST = 64 * 1024
#: How long a control connection may stay silent, in seconds (ngrokctl's
#: longest wait between two calls is its events wait, under a minute).
IDLE_TIMEOUT = 120.0
#: How many control connections may be open at once.
MAX_CONNECTIONS = 64
#: How long a probe of an existing socket may take, in seconds.
PROBE_TIMEOUT = 2.0

#: What an API key can fail with, each said to the user as it is.
_KEY_FAILURES = (
    NoAPIKey,
    APIError,
    APIUnavailable,
    APIResponseInvalid,
    OperatorNotInAccount,
    IdentityError,
)


class Controller:
    """
    What the control socket can ask of the daemon, whatever the protocol.

    @param daemon: the L{ngrokd.daemon.Daemon}.
    @param admin_gid: members of this group may change the daemon.
    """

    log = Logger()

    def __init__(
        self,
        daemon: Any,
        feed: EventFeed,
        reactor: Any,
        socket_description: str,
        admin_gid: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.feed = feed
        self._reactor = reactor
        self._socket = socket_description
        self.admin_gid = admin_gid
        self._daemon_uid = os.geteuid()

    def status(self) -> dict[str, Any]:
        status = self.daemon.daemon_status()
        fields = attrs.asdict(status)
        fields.update(
            ready=status.ready,
            not_ready_because=status.not_ready_because,
            registered=status.registered,
            uptime=status.uptime,
            config_path=self.daemon.config.path,
            socket=self._socket,
        )
        return fields

    def rows(self) -> tuple[EndpointStatus, ...]:
        rows: tuple[EndpointStatus, ...] = self.daemon.endpoint_status()
        return rows

    def check_change(self, peer: Peer | None, command: str) -> None:
        """
        @raise NotPermitted: C{peer} may not change the daemon.
        """
        if peer is not None and may_change(peer, self._daemon_uid, self.admin_gid):
            return
        server = self.daemon.config.server
        message = refusal(command, server.admin_group, self.daemon.config.path)
        if peer is None:
            message = f"{command}: this socket cannot tell who you are; " + message
        raise NotPermitted(message)

    async def set_api_key(self, peer: Peer | None, key: str) -> str:
        """
        Try C{key}, use it, then store it in the config file.

        @raise NotPermitted: see L{check_change}.
        @raise KeyRejected: the key does not work; nothing changed.
        @raise CommandFailed: the key works and is in use, but was not saved.
        """
        self.check_change(peer, "set-api-key")
        try:
            await self.daemon.set_api_key(key)
        except _KEY_FAILURES as e:
            raise KeyRejected(f"the API key was not accepted: {e}") from None
        path = self.daemon.config.path
        try:
            await deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                store_api_key,
                path,
                key.strip(),
            )
        except Exception as e:
            self.log.failure("cannot save the API key in {path}", path=path)
            raise CommandFailed(
                f"the API key works and is in use, but could not be saved in"
                f" {path} ({e}): it will be lost at the next start"
            ) from None
        self.log.info("the new API key is saved in {path}", path=path)
        return f"the API key works and is saved in {path}"

    async def reload(self, peer: Peer | None) -> dict[str, Any]:
        """
        Reload the daemon's configuration.

        @raise NotPermitted: see L{check_change}.
        """
        self.check_change(peer, "reload")
        result = await self.daemon.reload()
        return {
            "applied": list(result.applied),
            "restart": list(result.restart),
            "error": result.error,
        }


def _page(rows: Sequence[EndpointStatus], start: int, limit: int) -> int:
    """
    Where the page of C{rows} that begins at C{start} ends: at most
    C{limit} rows whose JSON fits in L{PAGE_BYTES}, and at least one.
    """
    size = 2
    end = start
    while end < len(rows) and end - start < limit:
        size += len(json.dumps(attrs.asdict(rows[end]))) + 1
        if size > PAGE_BYTES and end > start:
            break
        end += 1
    return end


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
        end = _page(rows, cursor, max(1, limit))
        answer: dict[str, Any] = {
            "endpoints": [attrs.asdict(row) for row in rows[cursor:end]]
        }
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


class LegacyJSON(Protocol):
    """
    The original's protocol: one JSON object, one JSON line back, close.
    """

    def __init__(self, controller: Controller, peer: Peer | None) -> None:
        self._controller = controller
        self._peer = peer
        self._buffer = b""
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        if len(self._buffer) > MAX_LEGACY_REQUEST:
            self._reply(error=f"request longer than {MAX_LEGACY_REQUEST} bytes")
            return
        text = self._buffer.decode("utf-8", "replace")
        try:
            request, _ = json.JSONDecoder().raw_decode(text)
        except ValueError as e:
            if b"\n" in self._buffer:
                self._reply(error=f"failed to decode command: {e}")
            return  # wait for the rest of the object
        self._answered = True
        Deferred.fromCoroutine(self._answer(request))

    async def _answer(self, request: Any) -> None:
        if not isinstance(request, dict):
            self._reply(error="failed to decode command: not a JSON object")
            return
        command = request.get("command")
        args = request.get("args") or []
        if command == "status":
            status = self._controller.status()
            data: dict[str, Any] = {
                "registered": status["registered"],
                "endpoint_count": status["endpoints"],
                "ingress_endpoint": status["ingress_endpoint"],
            }
            if status["operator_id"]:
                data["operator_id"] = status["operator_id"]
            self._reply(data=data)
        elif command == "list":
            self._reply(data=[_legacy_row(row) for row in self._controller.rows()])
        elif command == "set-api-key":
            if not args or not isinstance(args[0], str) or not args[0].strip():
                self._reply(error="API key required")
                return
            try:
                await self._controller.set_api_key(self._peer, args[0])
            except (NotPermitted, KeyRejected, CommandFailed) as e:
                self._reply(error=str(e))
            else:
                self._reply(data="API key set successfully")
        else:
            self._reply(error=f"unknown command: {command}")

    def _reply(self, data: Any = None, error: str = "") -> None:
        self._answered = True
        answer: dict[str, Any] = {"success": not error}
        if data is not None:
            answer["data"] = data
        if error:
            answer["error"] = error
        assert self.transport is not None
        self.transport.write(json.dumps(answer).encode() + b"\n")
        self.transport.loseConnection()


def _legacy_row(row: EndpointStatus) -> dict[str, Any]:
    """
    An endpoint as the original's C{list} answer has it.
    """
    try:
        target = parse_endpoint_url(row.url)
        host, port = target.host, target.port
    except EndpointURLError:
        host, port = "", 0
    address, _, listen_port = row.listen_address.rpartition(":")
    virtual = row.mode == "virtual"
    return {
        "id": row.id,
        "hostname": host,
        "ip": address.strip("[]") if virtual else "",
        "port": port,
        "url": row.url,
        "local_listener": row.listen_address,
        "network_port": 0 if virtual or not listen_port else int(listen_port),
        "listen_interface": row.mode,
    }


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
