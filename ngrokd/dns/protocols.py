# -*- test-case-name: ngrokd.test.test_dns_server -*-
"""
The DNS server's sockets: UDP datagrams and TCP connections, each query
handed to L{ngrokd.dns.server.DNSServer}.

Queries are taken from any source the socket receives, container bridges
included: the address listened on decides who can reach the server.

TCP is bounded: at most L{Limits.max_tcp} connections (one more is closed
at once), each closed after L{Limits.tcp_idle} seconds without a query, and
read no further while L{Limits.tcp_pipeline} of its queries are forwarded
and not yet answered.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol, ServerFactory, connectionDone
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from ngrokd.dns.server import DNSServer


class UDPListener(DatagramProtocol):
    """
    Queries over UDP.
    """

    transport: Any

    def __init__(self, server: DNSServer) -> None:
        self._server = server

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        def reply(data: bytes) -> None:
            self.transport.write(data, addr)

        self._server.received(datagram, addr[0], reply, False)


class TCPConnection(Int16StringReceiver):
    """
    Queries over one TCP connection (RFC 7766): each prefixed by its
    length, pipelined, each answered as soon as it can be.
    """

    factory: TCPFactory
    transport: Any
    _counted = False
    _in_flight = 0
    _paused = False
    _idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        factory = self.factory
        server = factory.server
        if len(factory.connections) >= server.limits.max_tcp:
            server.counters.tcp_refused += 1
            server.drops.occurred(
                ("", "TCP connections over the limit closed"),
                f"from {self.transport.getPeer().host}",
            )
            self.transport.abortConnection()
            return
        self._counted = True
        factory.connections.add(self)
        self._idle = factory.clock.callLater(server.limits.tcp_idle, self._timed_out)

    def _active(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.server.limits.tcp_idle)

    def _timed_out(self) -> None:
        self.factory.server.counters.tcp_idle_closed += 1
        self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:
        self._active()
        factory = self.factory
        pending = factory.server.received(
            string, self.transport.getPeer().host, self.sendString, True
        )
        if pending is None:
            return
        self._in_flight += 1
        if self._in_flight >= factory.server.limits.tcp_pipeline:
            self._paused = True
            self.transport.pauseProducing()
        pending.addBoth(self._answered)

    def _answered(self, result: object) -> None:
        self._in_flight -= 1
        self._active()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._counted:
            self.factory.connections.discard(self)


class TCPFactory(ServerFactory):
    """
    The TCP connections of one DNS server, for its listeners.
    """

    protocol = TCPConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, server: DNSServer, clock: IReactorTime) -> None:
        self.server = server
        self.clock = clock
        self.connections: set[TCPConnection] = set()

    def close_all(self) -> None:
        """
        Close every connection (when the server stops).
        """
        for connection in list(self.connections):
            connection.transport.abortConnection()
