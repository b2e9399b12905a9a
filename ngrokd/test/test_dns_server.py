"""
Tests for L{ngrokd.dns.service}, L{ngrokd.dns.server} and
L{ngrokd.dns.protocols}: the DNS server on 127.0.0.1, asked by real clients
(twisted.names' client, over UDP and TCP, and C{dig} when it is installed),
forwarding to a twisted.names server of the test's own.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from ipaddress import ip_address
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.udp import Port as UDPPort
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import client, dns, server
from twisted.names.error import DomainError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ngrokd.dns.answer import AnswerKind
from ngrokd.dns.forward import Forwarder
from ngrokd.dns.protocols import TCPFactory
from ngrokd.dns.server import DNSServer, Limits
from ngrokd.dns.service import MAX_READ, DNSService, listen_both
from ngrokd.dns.table import build_table
from ngrokd.dns.wire import EDNS_PAYLOAD

reactor: Any = _reactor

TABLE = build_table(
    {
        "web.default": [ip_address("10.107.0.2"), ip_address("fd00::2")],
        "db.default": [ip_address("10.107.0.3")],
        "*.apps.default": [ip_address("10.107.0.4")],
    }
)
#: Long enough for any answer on a loaded machine; the server's own bounds
#: are far shorter.
CLIENT_TIMEOUT = 20.0


class Upstream:
    """
    The upstream server's answers: every name has 192.0.2.1, but
    C{gone.example.org}, which does not exist.
    """

    asked = 0

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Any]:
        self.asked += 1
        if query.name.name == b"gone.example.org":
            return fail(DomainError(query.name.name))
        record = dns.Record_A("192.0.2.1", 60)
        return succeed(
            ([dns.RRHeader(query.name.name, dns.A, dns.IN, 60, record)], [], [])
        )


class _Raw(DatagramProtocol):
    """
    A UDP socket that sends bytes as they are and collects what comes back.
    """

    transport: Any

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.waiting: Deferred[bytes] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append(datagram)
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(datagram)

    def next(self) -> Deferred[bytes]:
        self.waiting = Deferred()
        return self.waiting.addTimeout(CLIENT_TIMEOUT, reactor)


def _query_bytes(
    name: bytes, qtype: int = dns.A, ident: int = 7, edns: int | None = None
) -> bytes:
    message = dns.Message(id=ident, recDes=1)
    message.queries = [dns.Query(name, qtype, dns.IN)]
    if edns is not None:
        message.additional = [
            dns.RRHeader(b"", dns.OPT, 4096, edns << 16, dns.UnknownRecord(b""))
        ]
    return message.toStr()


def _decode(data: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(data)
    return message


class ServerTestsMixin:
    """
    A DNS service on 127.0.0.1 and an upstream twisted.names server.
    """

    limits = Limits(forward_timeout=5.0)

    def start(
        self: Any, limits: Limits | None = None, upstream_port: int | None = None
    ) -> DNSService:
        self.upstream = Upstream()
        if upstream_port is None:
            factory = server.DNSServerFactory(authorities=[self.upstream])
            factory.noisy = False
            udp, tcp, upstream_port = listen_both(
                reactor,
                "127.0.0.1",
                0,
                lambda: dns.DNSDatagramProtocol(factory),
                factory,
            )
            self.addCleanup(udp.stopListening)
            self.addCleanup(tcp.stopListening)
        service = DNSService(
            [("127.0.0.1", 0)],
            [("127.0.0.1", upstream_port)],
            reactor,
            limits or self.limits,
            TABLE,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        self.port = service.addresses[0][1]
        self.resolver = client.Resolver(
            servers=[("127.0.0.1", self.port)], reactor=reactor
        )
        self.addCleanup(self._close_resolver)
        return service

    def _close_resolver(self: Any) -> None:
        for connection in list(self.resolver.connections):
            connection.transport.loseConnection()

    def ask(
        self: Any, name: str, qtype: int = dns.A, tcp: bool = False
    ) -> Deferred[dns.Message]:
        query = [dns.Query(name, qtype, dns.IN)]
        if tcp:
            return self.resolver.queryTCP(query, CLIENT_TIMEOUT)
        return self.resolver.queryUDP(query, (CLIENT_TIMEOUT,))

    def raw(self: Any, interface: str = "127.0.0.1") -> tuple[_Raw, int]:
        protocol = _Raw()
        port = reactor.listenUDP(0, protocol, interface=interface)
        self.addCleanup(port.stopListening)
        return protocol, port


def _payload(record: dns.RRHeader) -> Any:
    return record.payload


def _records(message: dns.Message) -> list[tuple[int, str]]:
    return [
        (r.type, _payload(r).dottedQuad() if r.type == dns.A else str(r.payload))
        for r in message.answers
    ]


class AnswerKindTests(ServerTestsMixin, TestCase):
    """
    Every kind of answer, over UDP and over TCP, as twisted.names' client
    gets it.
    """

    async def check_both(self, name: str, qtype: int) -> list[dns.Message]:
        self.start()
        return [await self.ask(name, qtype, tcp) for tcp in (False, True)]

    async def test_a(self) -> None:
        """
        A name of ours answers A with its address, TTL 5 s, authoritatively.
        """
        for message in await self.check_both("web.default", dns.A):
            self.assertEqual(message.rCode, dns.OK)
            self.assertTrue(message.auth)
            self.assertEqual(
                [(r.type, r.ttl, _payload(r).dottedQuad()) for r in message.answers],
                [(dns.A, 5, "10.107.0.2")],
            )

    async def test_aaaa(self) -> None:
        """
        A name with an IPv6 address answers AAAA with it.
        """
        for message in await self.check_both("WEB.default", dns.AAAA):
            self.assertEqual(message.rCode, dns.OK)
            self.assertEqual(
                [_payload(r).address for r in message.answers],
                [socket.inet_pton(socket.AF_INET6, "fd00::2")],
            )

    async def test_nodata(self) -> None:
        """
        A name of ours without an IPv6 address, asked AAAA (or MX), gets no
        error and no answer, with the zone's SOA in the authority section:
        never NXDOMAIN, which musl and busybox take for the whole name.
        """
        for qtype in (dns.AAAA, dns.MX):
            for message in await self.check_both("db.default", qtype):
                self.assertEqual(message.rCode, dns.OK)
                self.assertEqual(message.answers, [])
                self.assertEqual(
                    [(r.name.name, r.type) for r in message.authority],
                    [(b"default", dns.SOA)],
                )

    async def test_nxdomain(self) -> None:
        """
        A name that is not ours in a zone only we serve is NXDOMAIN, with the
        SOA, and is not asked upstream.
        """
        for message in await self.check_both("nope.default", dns.A):
            self.assertEqual(message.rCode, dns.ENAME)
            self.assertEqual([r.type for r in message.authority], [dns.SOA])
        self.assertEqual(self.upstream.asked, 0)

    async def test_wildcard(self) -> None:
        """
        Every name under a wildcard answers with its address; the name the
        wildcard hangs from exists (NODATA), so resolvers do not take all of
        it for gone.
        """
        for message in await self.check_both("a.b.apps.default", dns.A):
            self.assertEqual(_records(message), [(dns.A, "10.107.0.4")])
        for message in await self.check_both("apps.default", dns.A):
            self.assertEqual((message.rCode, message.answers), (dns.OK, []))

    async def test_ptr(self) -> None:
        """
        Our own address answers PTR with its name.
        """
        for message in await self.check_both("2.0.107.10.in-addr.arpa", dns.PTR):
            self.assertEqual(
                [_payload(r).name.name for r in message.answers], [b"web.default"]
            )

    async def test_forwarded(self) -> None:
        """
        A name not ours is asked upstream, and its answer (or its NXDOMAIN)
        passed on.
        """
        service = self.start()
        for tcp in (False, True):
            message = await self.ask("www.example.org", dns.A, tcp)
            self.assertEqual(_records(message), [(dns.A, "192.0.2.1")])
            gone = await self.ask("gone.example.org", dns.A, tcp)
            self.assertEqual(gone.rCode, dns.ENAME)
        self.assertEqual(self.upstream.asked, 4)
        self.assertEqual(service.server.counters.answered[AnswerKind.FORWARD], 4)

    async def test_tableSwapped(self) -> None:
        """
        After C{set_table}, the next query is answered from the new table,
        also for a name asked (and kept) before.
        """
        service = self.start()
        self.assertEqual(
            _records(await self.ask("db.default")), [(dns.A, "10.107.0.3")]
        )
        service.set_table(build_table({"db.default": [ip_address("10.107.0.9")]}))
        self.assertEqual(
            _records(await self.ask("db.default")), [(dns.A, "10.107.0.9")]
        )
        self.assertEqual((await self.ask("web.default")).rCode, dns.ENAME)


class UpstreamDownTests(ServerTestsMixin, TestCase):
    """
    An upstream that never answers costs the client a SERVFAIL once the
    forward's time is up, not its own timeout.
    """

    async def test_servfail(self) -> None:
        """
        A query forwarded to an upstream that reads nothing gets SERVFAIL
        from us, counted as a failed forward.
        """
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        service = self.start(
            Limits(forward_timeout=0.2), upstream_port=silent.getsockname()[1]
        )
        message = await self.ask("www.example.org")
        self.assertEqual(message.rCode, dns.ESERVER)
        self.assertEqual(service.server.counters.forward_failures, 1)
        self.flushLoggedErrors()


class ForwarderTests(ServerTestsMixin, TestCase):
    """
    The upstreams are asked in turn.
    """

    async def test_nextUpstream(self) -> None:
        """
        When the first upstream does not answer within its share of the
        time, the second is asked, and its answer is the forward's.
        """
        self.start()
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        upstream = self.service.upstreams.servers[0]
        forwarder = Forwarder([silent.getsockname(), upstream], reactor, 1.0)
        self.addCleanup(forwarder.stop)
        message = await forwarder.forward(dns.Query("www.example.org"), tcp=False)
        self.assertEqual(_records(message), [(dns.A, "192.0.2.1")])
        self.assertEqual(self.upstream.asked, 1)
        self.assertGreater(len(silent.recv(512, socket.MSG_DONTWAIT)), 12)


class EDNSTests(ServerTestsMixin, TestCase):
    """
    EDNS queries are answered with EDNS.
    """

    async def test_optAnswered(self) -> None:
        """
        A query with an OPT record gets an answer with ours: version 0, our
        UDP payload size.
        """
        self.start()
        raw, _ = self.raw()
        raw.transport.write(
            _query_bytes(b"web.default", edns=0), ("127.0.0.1", self.port)
        )
        message = _decode(await raw.next())
        self.assertEqual(_records(message), [(dns.A, "10.107.0.2")])
        [opt] = [r for r in message.additional if r.type == dns.OPT]
        self.assertEqual((opt.cls, opt.ttl), (EDNS_PAYLOAD, 0))

    async def test_badVersion(self) -> None:
        """
        An EDNS version we do not speak gets BADVERS (RFC 6891).
        """
        self.start()
        raw, _ = self.raw()
        raw.transport.write(
            _query_bytes(b"web.default", edns=1), ("127.0.0.1", self.port)
        )
        message = _decode(await raw.next())
        [opt] = [r for r in message.additional if r.type == dns.OPT]
        self.assertEqual(((opt.ttl >> 24) << 4) | message.rCode, 16)


def _compression_loop() -> bytes:
    # A question whose name points at itself.
    header = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0)
    return header + b"\xc0\x0c" + struct.pack("!HH", dns.A, dns.IN)


class MalformedTests(ServerTestsMixin, TestCase):
    """
    Packets that are no query are dropped and counted; the server goes on.
    """

    async def test_droppedAndCounted(self) -> None:
        """
        Garbage, a query cut short, a compression loop and a response are
        each dropped and counted, with one log line for them all; the next
        query is answered.
        """
        service = self.start()
        raw, _ = self.raw()
        good = _query_bytes(b"web.default")
        response = bytearray(good)
        response[2] |= 0x80
        bad = [b"\x00\x01garbage", good[:20], _compression_loop(), bytes(response)]
        for packet in bad:
            raw.transport.write(packet, ("127.0.0.1", self.port))
        raw.transport.write(good, ("127.0.0.1", self.port))
        message = _decode(await raw.next())
        self.assertEqual(_records(message), [(dns.A, "10.107.0.2")])
        self.assertEqual(raw.received, [raw.received[0]])
        self.assertEqual(service.server.counters.dropped_malformed, 4)


class FloodTests(ServerTestsMixin, TestCase):
    """
    One source over its rate is dropped; the others are still answered.
    """

    async def test_oneSourceLimited(self) -> None:
        """
        200 queries at once from 127.0.0.1 get answers for the burst only,
        the rest dropped and counted; a query from 127.0.0.2 is answered.
        """
        service = self.start(Limits(rate=0.001, burst=20))
        flood, _ = self.raw()
        for ident in range(200):
            flood.transport.write(
                _query_bytes(b"web.default", ident=ident), ("127.0.0.1", self.port)
            )
        for _ in range(200):
            if (
                service.server.counters.dropped_rate
                + service.server.counters.answered[AnswerKind.ANSWER]
                >= 200
            ):
                break
            await deferLater(reactor, 0.05)
        other, _ = self.raw("127.0.0.2")
        other.transport.write(_query_bytes(b"web.default"), ("127.0.0.1", self.port))
        self.assertEqual(_records(_decode(await other.next())), [(dns.A, "10.107.0.2")])
        self.assertEqual(service.server.counters.dropped_rate, 180)
        self.assertEqual(len(flood.received), 20)

    async def test_readsBounded(self) -> None:
        """
        A turn of the reactor reads a few dozen queries of a flood, not all
        that wait, so that the other sockets (the data path's connections)
        get their turn between them.
        """
        service = self.start(Limits(rate=None))
        query = _query_bytes(b"web.default")
        sent = 2 * MAX_READ // len(query) + 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            for _ in range(sent):
                flood.sendto(query, ("127.0.0.1", self.port))
            udp = service._ports[0]
            assert isinstance(udp, UDPPort)
            turns = []
            for _ in range(4):
                before = service.server.counters.answered[AnswerKind.ANSWER]
                udp.doRead()
                turns.append(
                    service.server.counters.answered[AnswerKind.ANSWER] - before
                )
        per_turn = -(-MAX_READ // len(query))
        self.assertEqual(turns, [per_turn, per_turn, sent - 2 * per_turn, 0])


class TCPLimitTests(ServerTestsMixin, TestCase):
    """
    TCP connections are bounded in number.
    """

    async def test_overLimitClosed(self) -> None:
        """
        With two connections open, a third is closed at once and counted;
        the two still answer.
        """
        service = self.start(Limits(max_tcp=2))
        sockets = []
        for _ in range(3):
            s = socket.create_connection(
                ("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT
            )
            s.setblocking(False)
            self.addCleanup(s.close)
            sockets.append(s)
        for _ in range(200):
            if service.server.counters.tcp_refused:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(service.server.counters.tcp_refused, 1)
        self.assertEqual(len(service._tcp.connections), 2)


@implementer(IReactorTCP, IReactorTime, IReactorUDP)
class _TCPTakenOnce:
    """
    The real reactor, but the first TCP port asked for is taken.
    """

    def __init__(self) -> None:
        self.tcp_tries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)

    def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        self.tcp_tries += 1
        if self.tcp_tries == 1:
            raise CannotListenError("127.0.0.1", port, OSError("taken"))
        return reactor.listenTCP(port, *args, **kwargs)


class PortTests(TestCase):
    """
    Port 0: one port number for UDP and TCP.
    """

    async def test_takenForTCP(self) -> None:
        """
        When the UDP port the kernel picked is taken for TCP, another is
        tried with a new protocol, and the service answers on it.
        """
        taken = _TCPTakenOnce()
        service = DNSService([("127.0.0.1", 0)], [], taken, Limits(), TABLE)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(taken.tcp_tries, 2)
        resolver = client.Resolver(servers=[service.addresses[0]], reactor=reactor)
        answers, _, _ = await resolver.lookupAddress(
            "web.default", timeout=[CLIENT_TIMEOUT]
        )
        self.assertEqual(answers[0].payload.dottedQuad(), "10.107.0.2")


class TCPIdleTests(SynchronousTestCase):
    """
    An idle TCP connection is closed (timed on a fake clock).
    """

    def test_idleClosed(self) -> None:
        """
        A connection quiet for C{tcp_idle} seconds is closed and counted; a
        query puts the time off.
        """
        clock = Clock()
        dnsServer = DNSServer(clock, None, Limits(tcp_idle=10), TABLE)
        factory = TCPFactory(dnsServer, clock)
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        clock.advance(9)
        query = _query_bytes(b"web.default")
        protocol.dataReceived(struct.pack("!H", len(query)) + query)
        self.assertTrue(transport.value())
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(dnsServer.counters.tcp_idle_closed, 1)
        protocol.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])


class DigTests(ServerTestsMixin, TestCase):
    """
    C{dig} (BIND's client) gets the same answers, with EDNS as it sends by
    default.
    """

    def setUp(self) -> None:
        if shutil.which("dig") is None:
            if os.environ.get("CI"):
                self.fail("dig is not installed (.ci/run installs dnsutils)")
            raise self.skipTest("dig is not installed (apt-get install dnsutils)")

    async def dig(self, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            shutil.which("dig") or "dig",
            ("@127.0.0.1", "-p", str(self.port), "+tries=1", "+time=10", *args),
            env={},
        )
        self.assertEqual(code, 0, err)
        return out.decode()

    async def test_answers(self) -> None:
        """
        A, AAAA, NODATA with SOA, NXDOMAIN, a wildcard and a forwarded name,
        over UDP with EDNS and over TCP.
        """
        self.start()
        for transport in ("+notcp", "+tcp"):
            self.assertEqual(
                (await self.dig(transport, "+short", "web.default")).split(),
                ["10.107.0.2"],
            )
            self.assertEqual(
                (await self.dig(transport, "+short", "web.default", "AAAA")).split(),
                ["fd00::2"],
            )
            self.assertEqual(
                (await self.dig(transport, "+short", "x.apps.default")).split(),
                ["10.107.0.4"],
            )
            self.assertEqual(
                (await self.dig(transport, "+short", "www.example.org")).split(),
                ["192.0.2.1"],
            )
            nodata = await self.dig(transport, "db.default", "AAAA")
            self.assertIn("status: NOERROR", nodata)
            self.assertIn("ANSWER: 0, AUTHORITY: 1", nodata)
            self.assertIn("udp: 1232", nodata)
            nxdomain = await self.dig(transport, "nope.default")
            self.assertIn("status: NXDOMAIN", nxdomain)
            self.assertIn("AUTHORITY: 1", nxdomain)
