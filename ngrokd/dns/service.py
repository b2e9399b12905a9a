# -*- test-case-name: ngrokd.test.test_dns_server -*-
"""
The DNS server as a Twisted service: UDP and TCP on each address given,
one L{DNSServer} behind them all.

A turn of the reactor reads at most L{MAX_READ} bytes of queries, so that
a flood of them cannot hold the data path's connections waiting.

The port is the caller's: 53 on the link's address in production, a high
port on 127.0.0.1 in the tests; port 0 takes a free UDP port and the same
number for TCP. The upstream servers given are filtered first
(L{ngrokd.dns.upstreams.choose_upstreams}): never this server itself, never
systemd-resolved's stub. Without any, names not ours get SERVFAIL and the
start says why, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol, ServerFactory
from twisted.internet.udp import Port as UDPPort
from twisted.logger import Logger

from ngrokd.dns.forward import MAX_DATAGRAM, Forwarder
from ngrokd.dns.protocols import TCPFactory, UDPListener
from ngrokd.dns.server import DEFAULT_LIMITS, DNSServer, Limits
from ngrokd.dns.table import EMPTY_TABLE, NameTable
from ngrokd.dns.upstreams import Address, Upstreams, choose_upstreams

#: Tries at a free port for both UDP and TCP, for port 0.
PORT_ATTEMPTS = 20
#: Bytes of queries read from a UDP socket in one turn of the reactor (a few
#: dozen queries; Twisted's default, 256 KiB, is thousands). Under a flood,
#: the reactor then turns to the data path's sockets after that many, not
#: after seconds of answering; the kernel drops what the server cannot take.
MAX_READ = 2048


class DNSService(Service):
    """
    Listens on C{listen} (host, port) addresses; forwards to C{upstreams}.

    @ivar server: answers the queries; its C{counters} are the metrics.
    @ivar upstreams: the upstreams chosen, and those left out with why.
    @ivar addresses: the (host, port) addresses listened on, once started.
    @param reactor: listens; it must provide C{IReactorUDP} and
        C{IReactorTime} too.
    """

    log = Logger()

    def __init__(
        self,
        listen: Sequence[Address],
        upstreams: Sequence[Address],
        reactor: IReactorTCP,
        limits: Limits = DEFAULT_LIMITS,
        table: NameTable = EMPTY_TABLE,
    ) -> None:
        self._listen = tuple(listen)
        self._reactor = reactor
        self.upstreams: Upstreams = choose_upstreams(upstreams, listen)
        clock = IReactorTime(reactor)
        forwarder = (
            Forwarder(
                self.upstreams.servers, IReactorUDP(reactor), limits.forward_timeout
            )
            if self.upstreams.servers
            else None
        )
        self.server = DNSServer(clock, forwarder, limits, table)
        self._tcp = TCPFactory(self.server, clock)
        self._ports: list[IListeningPort] = []
        self.addresses: list[Address] = []

    def set_table(self, table: NameTable) -> None:
        """
        Answer from C{table} from now on (L{DNSServer.set_table}).
        """
        self.server.set_table(table)

    def startService(self) -> None:
        """
        Listen on every address, UDP and TCP.

        @raise twisted.internet.error.CannotListenError: an address cannot be
            listened on; nothing is left listening.
        """
        try:
            for host, port in self._listen:
                self._listen_on(host, port)
        except Exception:
            for listening in self._ports:
                listening.stopListening()
            self._ports.clear()
            self.addresses.clear()
            raise
        Service.startService(self)
        for host, port in self.addresses:
            self._listening(host, port)
        if self.upstreams.reason is not None:
            self.log.warn(
                "DNS server: names not ours get SERVFAIL: {reason}",
                reason=self.upstreams.reason,
            )

    def listen(self, address: Address) -> None:
        """
        Listen on one more address, UDP and TCP, while running: one that
        may fail without the others failing (the IPv6 one).

        @raise twisted.internet.error.CannotListenError: it cannot be
            listened on; nothing is left listening there.
        """
        self._listen_on(*address)
        self._listening(*self.addresses[-1])

    def _listening(self, host: str, port: int) -> None:
        self.log.info(
            "DNS server listening on {host} port {port}", host=host, port=port
        )

    def _listen_on(self, host: str, port: int) -> None:
        udp, tcp, bound = listen_both(
            self._reactor, host, port, lambda: UDPListener(self.server), self._tcp
        )
        if isinstance(udp, UDPPort):
            udp.maxThroughput = MAX_READ
        self._ports += [udp, tcp]
        self.addresses.append((host, bound))

    def stopService(self) -> Deferred[object]:
        """
        Stop listening, close the TCP connections, and fire once the
        forwards in flight have ended.
        """
        Service.stopService(self)
        ports, self._ports = self._ports, []
        self.addresses = []
        for listening in ports:
            listening.stopListening()
        self._tcp.close_all()
        return self.server.stop()


def listen_both(
    reactor: IReactorTCP,
    host: str,
    port: int,
    datagrams: Callable[[], DatagramProtocol],
    streams: ServerFactory,
) -> tuple[IListeningPort, IListeningPort, int]:
    """
    Listen on one port number for UDP and TCP alike, and say which. With
    port 0, the UDP port the kernel picks may be taken for TCP; then
    another, a bounded number of times, each with a new protocol from
    C{datagrams}.

    @param reactor: listens; it must provide C{IReactorUDP} too.
    """
    datagram_reactor = IReactorUDP(reactor)
    for attempt in range(PORT_ATTEMPTS):
        udp = datagram_reactor.listenUDP(
            port, datagrams(), interface=host, maxPacketSize=MAX_DATAGRAM
        )
        address = udp.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        bound = address.port
        try:
            tcp = reactor.listenTCP(bound, streams, interface=host)
        except CannotListenError:
            udp.stopListening()
            if port != 0 or attempt == PORT_ATTEMPTS - 1:
                raise
            continue
        return udp, tcp, bound
    raise AssertionError("unreachable")
