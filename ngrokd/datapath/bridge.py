# -*- test-case-name: ngrokd.test.test_bridge -*-
"""
Carrying local connections to the binding ingress.

Each accepted connection stops reading, asks the L{IngressConnector} for an
upgraded connection to its endpoint, and is then spliced to it. For HTTP
endpoints served on a network port the client names ngrokd's address in
C{Host}, so every request on the connection gets the endpoint's hostname
instead; where the client already used the endpoint's name the bytes pass
untouched.

Both legs use TCP keepalive (L{KEEPALIVE_IDLE}, L{KEEPALIVE_INTERVAL},
L{KEEPALIVE_COUNT}), so a peer that vanished without a word (a machine
switched off, a network cut) is noticed and its connection closed. With an
idle timeout, a connection on which no byte moves either way for that long
is reset.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.datapath import wire
from ngrokd.datapath.httprewrite import HostRewriter
from ngrokd.datapath.ingress import (
    IngressConnector,
    IngressError,
    IngressProtocol,
    UpgradeRefused,
)
from ngrokd.datapath.splice import PipeProtocol, splice
from ngrokd.endpoints import HTTP_SCHEMES, EndpointTarget

#: Seconds a refused HTTP client has to read the 502 and close.
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
    """

    connections_open: int = 0
    connections_total: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_error: str = ""
    #: Failed connections by the failure's kind (L{IngressError.kind}).
    failures: dict[str, int] = field(factory=dict)


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
        self._rejecting = False
        self._rewriter: HostRewriter | None = None
        self._linger: IDelayedCall | None = None
        self._accepted = 0.0
        self._idle_check: IDelayedCall | None = None
        self._moved = 0
        self._idle_checks = 0

    def connectionMade(self) -> None:
        if self._factory.timings is not None:
            self._accepted = self._factory.connector.clock.seconds()
        self.transport.pauseProducing()
        self.transport.setTcpNoDelay(True)
        keep_alive(self.transport)
        self._factory.connections.add(self)
        stats = self._factory.stats
        stats.connections_open += 1
        stats.connections_total += 1
        target = self._factory.target
        request = wire.ConnRequest(host=target.host, port=target.port)
        try:
            self._connecting = self._factory.connector.connect(request)
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
        self._ingress = ingress
        self._factory.stats.last_error = ""  # the endpoint works again
        if self._factory.timings is not None:
            self._factory.timings.upgraded(self._elapsed())
        rewrite_host = self._factory.rewrite_host
        if rewrite_host is not None and _speaks_http(ingress, self._factory.target):
            self._rewriter = HostRewriter(rewrite_host)
            self.transform = self._rewrite
            self.finish_transform = self._rewriter.finish
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

    def _rewrite(self, data: bytes) -> bytes:
        assert self._rewriter is not None
        out = self._rewriter.feed(data)
        if self._rewriter.passthrough:
            # An upgraded or unparseable stream: from here on bytes pass as
            # they are. Only the latter is worth a word.
            self.transform = None
            if self._rewriter.gave_up and not self._factory.warned_unchanged:
                # Once per endpoint: for https in network mode, say, it
                # would be every connection.
                self._factory.warned_unchanged = True
                self.log.warn(
                    "{url}: passing a request on unchanged: {reason}",
                    url=self._factory.target.url,
                    reason=self._rewriter.gave_up,
                )
        return out

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        stats = self._factory.stats
        stats.errors += 1
        stats.last_error = failure.getErrorMessage()
        error = failure.value
        kind = error.kind if isinstance(error, IngressError) else "other"
        stats.failures[kind] = stats.failures.get(kind, 0) + 1
        # Logged by kind per endpoint; refusals by their code too.
        if isinstance(error, UpgradeRefused):
            kind = f"{kind} {error.code}"
        self._factory.connector.failures.failed(
            self._factory.target.url, kind, stats.last_error
        )
        if not self._factory.target.is_http:
            self.transport.loseConnection()
            return
        # Say why, then read and discard the request: closing with unread
        # input would reset the connection and lose the answer.
        self._rejecting = True
        self.transport.write(_bad_gateway(stats.last_error))
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._linger = self._factory.connector.clock.callLater(
            REJECT_LINGER,
            self.transport.abortConnection,
        )

    def dataReceived(self, data: bytes) -> None:
        if not self._rejecting:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self._rejecting:
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
        stats = self._factory.stats
        stats.connections_open -= 1
        stats.bytes_up += self.bytes_received
        if self._ingress is not None:
            stats.bytes_down += self._ingress.bytes_received
        if self._factory.timings is not None:
            self._factory.timings.closed(self._elapsed())
        super().connectionLost(reason)

    def _elapsed(self) -> float:
        return self._factory.connector.clock.seconds() - self._accepted


def _speaks_http(ingress: IngressProtocol, target: EndpointTarget) -> bool:
    proto = ingress.response.proto if ingress.response is not None else ""
    return (proto or target.scheme) in HTTP_SCHEMES


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

    def buildProtocol(self, addr: Any) -> LocalProtocol:
        return LocalProtocol(self)
