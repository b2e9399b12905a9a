# -*- test-case-name: ngrokd.test.test_dns_server -*-
"""
Asking the upstream servers what is not ours, with twisted.names' client
protocol, within a bound of time.

A forward asks each upstream in turn, each for its share of
L{Forwarder.timeout}, so the whole forward ends within it. Over UDP it goes
out of one socket per address family, opened at the first forward and kept:
twisted.names' resolver opens a socket per query, and Twisted logs two
lines for each socket, a line per packet. An answer is taken only with the
query's id (random, from the system's CSPRNG) and from the server asked.
A truncated answer is asked again over TCP when the client used TCP; a UDP
client gets it truncated, and comes back over TCP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.names import client, dns
from twisted.names.error import DNSQueryTimeoutError

from ngrokd.dns.upstreams import Address

#: The largest datagram a UDP port of ours takes: Twisted's default, which
#: its L{IReactorUDP} does not declare.
MAX_DATAGRAM = 8192


class Forwarder:
    """
    Forwards queries to C{servers}, each forward ending within C{timeout}
    seconds: with the upstream's answer, or failing.

    @param reactor: listens for the answers over UDP; it must provide
        C{IReactorTime} and C{IReactorTCP} too.
    """

    def __init__(
        self, servers: Sequence[Address], reactor: IReactorUDP, timeout: float
    ) -> None:
        if not servers:
            raise ValueError("a forwarder needs at least one upstream server")
        self.servers = tuple(servers)
        self.timeout = timeout
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._share = timeout / len(servers)
        self._sockets: dict[int, dns.DNSDatagramProtocol] = {}
        self._tcp = client.Resolver(servers=list(servers), reactor=reactor)

    def forward(self, query: dns.Query, tcp: bool) -> Deferred[dns.Message]:
        """
        The upstream's answer to C{query}; over TCP when its UDP answer was
        truncated and C{tcp}.
        """
        asked = Deferred.fromCoroutine(self._ask([query]))
        if tcp:
            asked.addCallback(self._again_over_tcp)
        return asked

    async def _ask(self, queries: list[dns.Query]) -> dns.Message:
        timed_out: DNSQueryTimeoutError | None = None
        for server in self.servers:
            try:
                answer: dns.Message = await self._socket(server).query(
                    server, queries, self._share
                )
                return answer
            except DNSQueryTimeoutError as e:
                timed_out = e
        assert timed_out is not None
        raise timed_out

    def _socket(self, server: Address) -> dns.DNSDatagramProtocol:
        version = ipaddress.ip_address(server[0]).version
        socket = self._sockets.get(version)
        if socket is None:
            socket = dns.DNSDatagramProtocol(self, reactor=self._reactor)
            socket.noisy = False
            interface = "::" if version == 6 else ""
            self._reactor.listenUDP(
                0, socket, interface=interface, maxPacketSize=MAX_DATAGRAM
            )
            self._sockets[version] = socket
        return socket

    def messageReceived(
        self, message: dns.Message, protocol: object, address: object = None
    ) -> None:
        """
        A message that answers no query in flight (one that came after its
        query timed out): dropped.
        """

    def _again_over_tcp(
        self, message: dns.Message
    ) -> dns.Message | Deferred[dns.Message]:
        if not message.trunc:
            return message
        again: Deferred[dns.Message] = self._tcp.queryTCP(message.queries, self.timeout)
        return again.addTimeout(self.timeout, self._clock)

    def stop(self) -> None:
        """
        Close the sockets (once no forward is in flight).
        """
        for socket in self._sockets.values():
            socket.transport.stopListening()
        self._sockets.clear()
        for connection in list(self._tcp.connections):
            connection.transport.loseConnection()
