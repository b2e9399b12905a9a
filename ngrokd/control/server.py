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

Whoever may open the socket must not be able to take the daemon's memory
or its file descriptors: an AMP box is capped (L{MAX_BOX_BYTES}), a
connection is read no further while its answers are unsent or unfinished
(L{MAX_PENDING_ANSWERS}), at most L{MAX_CONNECTIONS} are served with
L{RESERVED_CONNECTIONS} more for root and the daemon's user, and a
connection turned away is told "too many connections". Each connection
closed for it is logged, a flood in a few lines.
"""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
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
from ngrokd.control.address import AddressError, ControlAddress, control_address
from ngrokd.control.commands import (
    COMMANDS,
    PROTOCOL_VERSION,
    TOO_MANY_CONNECTIONS,
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
from ngrokd.control.peer import Peer, peer_of, privileged
from ngrokd.status import EndpointStatus
from ngrokd.summarylog import Summariser, Summary

#: The longest a reader may wait for events in one call, in seconds.
MAX_EVENT_WAIT = 30.0
#: How long a control connection may stay silent, in seconds (ngrokctl's
#: longest wait between two calls is its events wait, under a minute).
IDLE_TIMEOUT = 120.0
#: How many control connections are served at once.
MAX_CONNECTIONS = 64
#: How many more are kept for root and the daemon's own user, so that a
#: member of the socket's group holding L{MAX_CONNECTIONS} cannot lock
#: them out.
RESERVED_CONNECTIONS = 8
#: How many connections turned away may wait at once for their first
#: request, to be told why; beyond these, one is closed at once.
MAX_TURNED_AWAY = 16
#: How long a connection turned away may take to send its first request.
TURN_AWAY_TIMEOUT = 5.0
#: The most bytes one AMP box may hold: a request of this protocol is one
#: value of at most 64 KiB and a few short keys.
MAX_BOX_BYTES = 72 * 1024
#: The most keys one AMP box may hold (no command here has more than four).
MAX_BOX_KEYS = 32
#: How many requests of one connection may wait for their answer at once
#: (C{ngrokctl} sends one at a time); beyond these, and while the answers
#: sent are not read, the connection is read no further.
MAX_PENDING_ANSWERS = 8
#: How long a probe of an existing socket may take, in seconds.
PROBE_TIMEOUT = 2.0


#: Called with the kind of a closed connection and why it was closed.
Closing = Callable[[str, str], None]


class ControlAMP(amp.AMP):
    """
    The AMP side of a control connection.

    It is its transport's producer: while more than the transport's buffer
    of answers is unsent, or L{MAX_PENDING_ANSWERS} requests wait for
    theirs, it parses no further request and the transport reads no
    further. A box over L{MAX_BOX_BYTES} or L{MAX_BOX_KEYS} closes the
    connection.

    @param turned_away: when not empty, this connection is not served: its
        first request is answered with this (L{TOO_MANY_CONNECTIONS}), then
        it is closed.
    """

    def __init__(
        self,
        controller: Controller,
        peer: Peer | None,
        closing: Closing,
        turned_away: str = "",
    ) -> None:
        amp.AMP.__init__(self)
        self._controller = controller
        self._peer = peer
        self._closing = closing
        self._turned_away = turned_away
        #: The rows being listed, taken at the first page so that the
        #: pages of one listing agree.
        self._listing: tuple[EndpointStatus, ...] = ()
        self._box_bytes = 0
        self._box_strings = 0
        self._pending = 0
        #: The transport holds more answers than its buffer.
        self.answers_unread = False
        self._receiving = False
        self._closed = False

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's own, which logs every connection: ngrokctl makes one
        # per command, and health checks one every few seconds.
        amp.BinaryBoxProtocol.makeConnection(self, transport)
        transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        amp.BinaryBoxProtocol.connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        self._receiving = True
        try:
            amp.AMP.dataReceived(self, data)
        except (amp.AmpError, KeyError) as e:
            # An empty box, or an answer to nothing asked: not a client.
            what = type(e).__name__
            self._close("malformed", f"sent what is not an AMP request ({what})")
        finally:
            self._receiving = False

    def stringReceived(self, string: bytes) -> None:
        if self._closed:
            return
        self._box_bytes += len(string) + 2
        self._box_strings += 1
        if self._box_bytes > MAX_BOX_BYTES or self._box_strings > 2 * MAX_BOX_KEYS:
            self._close(
                "oversized",
                f"sent a request over {MAX_BOX_BYTES} bytes or {MAX_BOX_KEYS} keys",
            )
            return
        if not string and self.state in ("init", "key"):  # the box ends
            self._box_bytes = self._box_strings = 0
        amp.AMP.stringReceived(self, string)

    def _close(self, kind: str, reason: str) -> None:
        self._closed = True
        self._hold()
        self._closing(kind, reason)
        _abort(self.transport)

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if self._turned_away:
            self._closed = True  # the error box closes the connection
            self._hold()
            return fail(
                amp.RemoteAmpError(TOO_MANY_CONNECTIONS, self._turned_away, fatal=True)
            )
        answering: Deferred[Any] = amp.AMP.dispatchCommand(self, box)
        if not answering.called:
            self._pending += 1
            self._hold()
            answering.addBoth(self._answered)
        return answering

    def _answered(self, result: object) -> object:
        self._pending -= 1
        self._hold()
        return result

    def pauseProducing(self) -> None:
        # The transport: more answers unsent than its buffer.
        self.answers_unread = True
        self._hold()

    def resumeProducing(self) -> None:
        self.answers_unread = False
        self._hold()

    def stopProducing(self) -> None:
        self._closed = True
        self.paused = True

    def _hold(self) -> None:
        """
        Read and parse requests only while their answers are being read
        and few wait to be made.
        """
        hold = (
            self._closed or self.answers_unread or self._pending >= MAX_PENDING_ANSWERS
        )
        if hold == self.paused:
            return
        self.paused = hold
        transport: Any = self.transport
        if hold:
            transport.pauseProducing()
            return
        transport.resumeProducing()
        if not self._receiving:  # parse what was read before the pause
            self.dataReceived(b"")

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
        self,
        cursor: int | None = None,
        limit: int | None = None,
        search: str | None = None,
        state: str | None = None,
    ) -> dict[str, Any]:
        cursor = cursor or 0
        limit = limit or 1000
        if cursor == 0 or not self._listing:
            self._listing = self._controller.rows(search or "", state or "")
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


def admitted(serving: int, peer: Peer | None, daemon_uid: int) -> bool:
    """
    Whether a new connection from C{peer} is served while C{serving} are:
    up to L{MAX_CONNECTIONS}, and L{RESERVED_CONNECTIONS} more for root
    and the daemon's user.
    """
    reserve = RESERVED_CONNECTIONS if privileged(peer, daemon_uid) else 0
    return serving < MAX_CONNECTIONS + reserve


#: What a connection turned away is told.
TURNED_AWAY = (
    f"too many connections: ngrokd serves {MAX_CONNECTIONS} control"
    f" connections at once ({RESERVED_CONNECTIONS} more for root and its own"
    " user); try again when one closes"
)


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


class ControlFactory(Factory):
    """
    Makes control connections: see L{admitted} for how many are served.
    Each is closed after L{IDLE_TIMEOUT} seconds without a byte from its
    peer.
    """

    noisy = False

    def __init__(
        self,
        controller: Controller,
        credentials: Callable[[Any], Peer],
        clock: IReactorTime,
        notices: ConnectionNotices,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.controller = controller
        self.credentials = credentials
        self.clock = clock
        self.notices = notices
        self.idle_timeout = idle_timeout
        #: Connections served.
        self.open = 0
        #: Connections waiting to be told they are not served.
        self.turned_away = 0

    def buildProtocol(self, addr: object) -> Protocol:
        return ControlProtocol(self)


class ControlProtocol(Protocol):
    """
    Picks the protocol from the first byte, then hands everything to it.
    A connection beyond the limit is handed to one that only says so.
    """

    def __init__(self, factory: ControlFactory) -> None:
        self._factory = factory
        self._controller = factory.controller
        self._credentials = factory.credentials
        self._delegate: ControlAMP | LegacyJSON | None = None
        self._idle: IDelayedCall | None = None
        self._peer: Peer | None = None
        #: Which count of the factory holds this connection.
        self._counted = ""
        self._turned_away = ""

    def connectionMade(self) -> None:
        factory = self._factory
        self._peer = self._peer_of()
        timeout = factory.idle_timeout
        if admitted(factory.open, self._peer, self._controller.daemon_uid):
            factory.open += 1
            self._counted = "open"
        else:
            factory.notices.closed("busy", f"was turned away: {TURNED_AWAY}")
            assert self.transport is not None
            if factory.turned_away >= MAX_TURNED_AWAY:
                _abort(self.transport)
                return
            factory.turned_away += 1
            self._counted = "turned_away"
            self._turned_away = TURNED_AWAY
            timeout = TURN_AWAY_TIMEOUT
        self._idle = factory.clock.callLater(timeout, self._timed_out, timeout)

    def _timed_out(self, timeout: float) -> None:
        if not self._turned_away:
            if self._delegate is not None and self._delegate.answers_unread:
                reason = f"read none of its answers for {timeout:g}s"
            else:
                reason = f"sent nothing for {timeout:g}s"
            self._factory.notices.closed("idle", reason)
        _abort(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active() and not self._turned_away:
            self._idle.reset(self._factory.idle_timeout)
        if self._delegate is None:
            delegate: ControlAMP | LegacyJSON
            if data[:1] == b"{":
                delegate = LegacyJSON(self._controller, self._peer, self._turned_away)
            else:
                delegate = ControlAMP(
                    self._controller,
                    self._peer,
                    self._factory.notices.closed,
                    self._turned_away,
                )
            delegate.makeConnection(self.transport)
            self._delegate = delegate
        self._delegate.dataReceived(data)

    def _peer_of(self) -> Peer | None:
        try:
            return self._credentials(self.transport)
        except (OSError, AttributeError):
            return None  # not a UNIX socket: changes are refused

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted == "open":
            self._factory.open -= 1
        elif self._counted == "turned_away":
            self._factory.turned_away -= 1
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._delegate is not None:
            self._delegate.connectionLost(reason)


def _abort(transport: Any) -> None:
    """
    Close C{transport} now, dropping what it has not sent.
    """
    transport.abortConnection()


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
        self._notices = ConnectionNotices(reactor, self._description)
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
            self._reactor,
            self._notices,
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

    async def _endpoint(self, address: ControlAddress) -> Any:
        """
        The endpoint to listen on; for a path, after making sure no live
        process answers there (C{None} then, with the reason logged).
        """
        if not address.path:
            try:
                return serverFromString(self._reactor, address.description)
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
