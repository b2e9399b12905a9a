# -*- test-case-name: ngrokd.test.test_bridge -*-
"""
Carrying local connections to the binding ingress.

Each accepted connection asks the L{IngressConnector} for an upgraded
connection to its endpoint, and is then spliced to it. Until the ingress
answers, the client is read once, and what it sent goes right behind the
request (L{EarlyData}; with C{ingress.early_data} off, it is not read at
all until then). A refusal or a failure reaches an HTTP client as a 502
naming it, and any other as a reset.

Whether an endpoint speaks HTTP is known from its URL. For HTTP endpoints
served on a network port the client names ngrokd's address in C{Host}, so
every request on the connection gets the endpoint's hostname instead; where
the client already used the endpoint's name the bytes pass untouched.

HTTP connections are framed both ways (L{ngrokd.datapath.httpdrain}) so
that, when the daemon stops, each ends at a response boundary within the
grace it gets: at once if it is idle between requests, else once the answers
to the requests already begun are complete, the last one saying
C{Connection: close}.

Both legs use TCP keepalive (L{KEEPALIVE_IDLE}, L{KEEPALIVE_INTERVAL},
L{KEEPALIVE_COUNT}), so a peer that vanished without a word (a machine
switched off, a network cut) is noticed and its connection closed. With an
idle timeout, a connection on which no byte moves either way for that long
is reset.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.datapath import wire
from ngrokd.datapath.earlydata import EarlyData
from ngrokd.datapath.httpdrain import Exchanges
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.splice import PipeProtocol, splice
from ngrokd.datapath.upgrade import IngressError, IngressProtocol, UpgradeRefused
from ngrokd.endpoints import EndpointTarget

#: Seconds an HTTP client we hang up on (after a 502, or at a response
#: boundary when stopping) has to read our last answer and close.
REJECT_LINGER = 5.0
#: TCP keepalive: seconds of silence before the first probe, seconds between
#: probes, and unanswered probes before the connection is dropped: a dead
#: peer is found within about two minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
#: An idle connection is checked this many times per idle timeout, so it is
#: reset at most a quarter late.
IDLE_CHECKS = 4


def keep_alive(transport: Any) -> None:
    """
    Turn on TCP keepalive on a TCP transport, or on the TCP under a TLS
    one, with ngrokd's timing where the platform and the socket let it be
    set.
    """
    transport.setTcpKeepAlive(True)  # a TLS transport passes it on
    tcp = getattr(transport, "transport", transport)
    handle = tcp.getHandle()
    if not isinstance(handle, socket.socket):
        return
    for name, value in [
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ]:
        option = getattr(socket, name, None)
        if option is not None:
            handle.setsockopt(socket.IPPROTO_TCP, option, value)


@define
class EndpointStats:
    """
    What one endpoint's listener has carried, for status and metrics.

    Each count is changed at a connection's start, failure and end (its
    bytes once, when it ends), in the daemon-wide C{totals} too when given,
    and C{on_change} is then called: that is how the kept status rows
    (L{ngrokd.board}) learn of it, rather than reading every listener.
    """

    connections_open: int = 0
    connections_total: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_error: str = ""
    #: Failed connections by the failure's kind (L{IngressError.kind}).
    failures: dict[str, int] = field(factory=dict)
    totals: EndpointStats | None = field(default=None, eq=False, repr=False)
    on_change: Callable[[], object] | None = field(default=None, eq=False, repr=False)
    #: Counts the changes, so that a reader may keep what it made of them.
    changes: int = field(default=0, eq=False, repr=False)

    def opened(self) -> None:
        for stats in self._counted():
            stats.connections_open += 1
            stats.connections_total += 1
        self._changed()

    def worked(self) -> None:
        """
        A connection was upgraded: the endpoint works (again).
        """
        if self.last_error:
            self.last_error = ""
            self._changed()

    def failed(self, kind: str, message: str) -> None:
        for stats in self._counted():
            stats.errors += 1
            stats.last_error = message
            stats.failures[kind] = stats.failures.get(kind, 0) + 1
        self._changed()

    def closed(self, up: int, down: int) -> None:
        for stats in self._counted():
            stats.connections_open -= 1
            stats.bytes_up += up
            stats.bytes_down += down
        self._changed()

    def _counted(self) -> tuple[EndpointStats, ...]:
        return (self,) if self.totals is None else (self, self.totals)

    def _changed(self) -> None:
        self.changes += 1
        if self.on_change is not None:
            self.on_change()


class ConnectionTimings(Protocol):
    """
    Observes each connection's time to upgrade and lifetime, in seconds.
    """

    def upgraded(self, seconds: float) -> None: ...
    def closed(self, seconds: float) -> None: ...


class LocalProtocol(PipeProtocol):
    """
    One accepted local connection, bridged to the ingress.
    """

    log = Logger()

    def __init__(self, factory: BridgeFactory) -> None:
        super().__init__()
        self._factory = factory
        self._connecting: Deferred[IngressProtocol] | None = None
        self._ingress: IngressProtocol | None = None
        #: Where the client's first read goes before the answer.
        self._early: EarlyData | None = None
        self._hanging_up = False
        self._exchanges: Exchanges | None = None
        self._linger: IDelayedCall | None = None
        self._accepted = 0.0
        self._idle_check: IDelayedCall | None = None
        self._moved = 0
        self._idle_checks = 0

    def connectionMade(self) -> None:
        connector = self._factory.connector
        if self._factory.timings is not None:
            self._accepted = connector.clock.seconds()
        if connector.early_data:
            self._early = EarlyData()
        else:
            self.transport.pauseProducing()
        self.transport.setTcpNoDelay(True)
        keep_alive(self.transport)
        self._factory.connections.add(self)
        self._factory.stats.opened()
        target = self._factory.target
        if target.is_http:
            # Known from the endpoint's URL, not the ingress's answer: the
            # first request may go before it.
            exchanges = self._exchanges = Exchanges(self._factory.rewrite_host)
            self.transform = self._upstream
            self.finish_transform = exchanges.upstream_done
            if self._factory.draining:
                exchanges.drain()
        request = wire.ConnRequest(host=target.host, port=target.port)
        try:
            self._connecting = connector.connect(request, self._early)
        except IngressError as e:
            self._failed(Failure(e))
            return
        self._connecting.addCallbacks(self._upgraded, self._failed)

    @property
    def ingress(self) -> IngressProtocol | None:
        """
        The upgraded connection to the ingress, once there is one.
        """
        return self._ingress

    def _upgraded(self, ingress: IngressProtocol) -> None:
        self._connecting = None
        self._early = None
        self._ingress = ingress
        self._factory.stats.worked()
        if self._factory.timings is not None:
            self._factory.timings.upgraded(self._elapsed())
        if self._exchanges is not None:
            ingress.transform = self._downstream
            ingress.finish_transform = self._exchanges.responses.finish
        keep_alive(ingress.transport)
        splice(self, ingress, self._factory.connector.clock)
        self._watch_idle()

    def _watch_idle(self) -> None:
        """
        Reset the connection once no byte has moved either way for the
        endpoint's idle timeout (checked a few times per timeout).
        """
        timeout = self._factory.idle_timeout
        if timeout is None or self._lost:
            return
        assert self._ingress is not None
        moved = self.bytes_received + self._ingress.bytes_received
        if moved != self._moved:
            self._moved, self._idle_checks = moved, 0
        elif self._idle_checks == IDLE_CHECKS:
            self.abort()
            return
        self._idle_checks += 1
        self._idle_check = self._factory.connector.clock.callLater(
            timeout / IDLE_CHECKS, self._watch_idle
        )

    def _upstream(self, data: bytes) -> bytes:
        exchanges = self._exchanges
        assert exchanges is not None
        out = exchanges.upstream(data)
        requests = exchanges.requests
        if requests.passthrough:
            # An upgraded or unparseable stream: from here on bytes pass as
            # they are. Only the latter is worth a word, where it costs the
            # Host rewrite.
            self.transform = None
            if (
                requests.gave_up
                and self._factory.rewrite_host is not None
                and not self._factory.warned_unchanged
            ):
                # Once per endpoint: for https in network mode, say, it
                # would be every connection.
                self._factory.warned_unchanged = True
                self.log.warn(
                    "{url}: passing a request on unchanged: {reason}",
                    url=self._factory.target.url,
                    reason=requests.gave_up,
                )
        return out

    def _downstream(self, data: bytes) -> bytes:
        exchanges = self._exchanges
        assert exchanges is not None and self._ingress is not None
        out = exchanges.downstream(data)
        if exchanges.responses.passthrough:
            self._ingress.transform = None
        elif exchanges.ended:
            if out:
                self.transport.write(out)
            self._end_at_boundary()
            return b""
        return out

    def drain(self) -> None:
        """
        The daemon is stopping: end an HTTP connection at a response
        boundary (at once if it is idle between requests); anything else
        keeps the grace.
        """
        exchanges = self._exchanges
        if exchanges is not None and not self._hanging_up:
            exchanges.drain()
            if exchanges.ended:
                self._end_at_boundary()

    def _end_at_boundary(self) -> None:
        """
        The last answer is complete: close the ingress leg, and hang up on
        the client once that answer is sent.
        """
        ingress = self._ingress
        assert ingress is not None
        self.transform = ingress.transform = None
        if self._lost:
            return
        ingress.peer = None  # its end is not the client's any more
        ingress.close()
        self._hang_up()

    def _hang_up(self) -> None:
        """
        Send our FIN once what was written is out, then read and discard what
        the client still sends until it closes, for at most L{REJECT_LINGER}
        seconds: closing with unread input would reset the connection and
        could lose the answer (RFC 9112 section 9.6).
        """
        self._hanging_up = True
        self.transport.unregisterProducer()
        if self._read_done:
            self.transport.loseConnection()
            return
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._linger = self._factory.connector.clock.callLater(
            REJECT_LINGER,
            self.transport.abortConnection,
        )

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        stats = self._factory.stats
        error = failure.value
        kind = error.kind if isinstance(error, IngressError) else "other"
        stats.failed(kind, failure.getErrorMessage())
        # Logged by kind per endpoint; refusals by their code too.
        if isinstance(error, UpgradeRefused):
            kind = f"{kind} {error.code}"
        self._factory.connector.failures.failed(
            self._factory.target.url, kind, stats.last_error
        )
        if not self._factory.target.is_http:
            # A reset: a clean end would pass for the endpoint's.
            self.transport.abortConnection()
            return
        # Say why, then read and discard the request.
        self.transport.write(_bad_gateway(stats.last_error))
        self._hang_up()

    def dataReceived(self, data: bytes) -> None:
        if self._hanging_up:
            return
        early = self._early
        if early is None or self.peer is not None:
            super().dataReceived(data)
            return
        # The first read goes now; the next waits for the answer.
        self._early = None
        self.transport.pauseProducing()
        self.bytes_received += len(data)
        if self.transform is not None:
            data = self.transform(data)
        early.offer(data)

    def readConnectionLost(self) -> None:
        if self._hanging_up:
            self.transport.loseConnection()
        else:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        for timer in (self._linger, self._idle_check):
            if timer is not None and timer.active():
                timer.cancel()
        self._factory.connections.discard(self)
        down = self._ingress.bytes_received if self._ingress is not None else 0
        self._factory.stats.closed(self.bytes_received, down)
        if self._factory.timings is not None:
            self._factory.timings.closed(self._elapsed())
        super().connectionLost(reason)

    def _elapsed(self) -> float:
        return self._factory.connector.clock.seconds() - self._accepted


def _bad_gateway(reason: str) -> bytes:
    body = f"ngrokd: the endpoint could not be reached: {reason}\n".encode()
    return (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class BridgeFactory(Factory):
    """
    Builds the local side of every connection accepted for one endpoint.

    C{rewrite_host} is the C{Host} value HTTP requests get, or C{None} to pass
    requests untouched; C{timings}, when given, observes every connection;
    C{idle_timeout}, when given, resets connections on which nothing moved
    for that many seconds.
    """

    noisy = False  # ListenerSet logs where it listens

    def __init__(
        self,
        target: EndpointTarget,
        connector: IngressConnector,
        rewrite_host: str | None,
        stats: EndpointStats | None = None,
        timings: ConnectionTimings | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.target = target
        self.idle_timeout = idle_timeout
        self.connector = connector
        self.rewrite_host = rewrite_host
        self.stats = stats if stats is not None else EndpointStats()
        self.timings = timings
        self.connections: set[LocalProtocol] = set()
        #: Whether a request was passed on unchanged (and said so).
        self.warned_unchanged = False
        #: Whether the grace of a stop has started.
        self.draining = False

    def buildProtocol(self, addr: Any) -> LocalProtocol:
        return LocalProtocol(self)

    def drain(self) -> None:
        """
        The grace of a stop starts: HTTP connections, open and to come, end
        at their next response boundary (L{LocalProtocol.drain}).
        """
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
