"""
Tests for L{ngrokd.datapath.bridge}: the local side of each connection, in
memory for the moments loopback cannot stage (a client leaving mid-connect,
a refusal, a response frame followed by bytes in one read), and over real
mutual TLS to the devcloud's ingress for flow control towards a backend.
"""

from __future__ import annotations

import re
import socket
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorSocket
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.datapath import wire
from ngrokd.datapath.bridge import REJECT_LINGER, BridgeFactory, LocalProtocol
from ngrokd.datapath.earlydata import EarlyData
from ngrokd.datapath.failurelog import FailureLog
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.upgrade import IngressProtocol
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.ingress import IngressFault
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.ngrok.identity import generate_key, make_csr
from ngrokd.ngrok.trust import PartialChainTrust
from ngrokd.test.helpers import (
    Counter,
    Echo,
    Recorder,
    Source,
    TCPLikeTransport,
    assert_flow_controlled,
    connect,
    devcloud_ingress,
    listen,
    wait_until,
)

ECHO = "tcp://echo.test:7"
REFUSAL = wire.ConnResponse(
    error_code="ERR_NGROK_3200", error_message="endpoint db.test:5432 not found"
)


class UpgradingConnector:
    """
    Stands in for L{IngressConnector} once TCP and TLS are up: every connect
    is a real L{IngressProtocol} on a L{TCPLikeTransport}, upgraded (or
    refused) when the test feeds it the ingress's answer.
    """

    def __init__(self, early_data: bool) -> None:
        self.clock = Clock()
        self.connections: list[IngressProtocol] = []
        self.failures = FailureLog(self.clock)
        self.early_data = early_data

    def connect(
        self, request: wire.ConnRequest, early: EarlyData | None = None
    ) -> Deferred[IngressProtocol]:
        protocol = IngressProtocol(request, self.clock, 10.0, 10.0, early=early)
        protocol.makeConnection(TCPLikeTransport())
        self.connections.append(protocol)
        return protocol.upgraded


class BridgeTestCase(SynchronousTestCase):
    """
    A bridge for C{url} whose connections go through an L{UpgradingConnector}.
    """

    url = "tcp://db.test:5432"
    rewrite_host: str | None = None
    early_data = False

    def setUp(self) -> None:
        self.connector = UpgradingConnector(self.early_data)
        self.factory = BridgeFactory(
            parse_endpoint_url(self.url),
            cast(IngressConnector, self.connector),
            self.rewrite_host,
        )
        self.addCleanup(self.assertNoTimersLeft)
        self.addCleanup(self.connector.failures.stop)  # (runs first)

    def assertNoTimersLeft(self) -> None:
        self.assertEqual(self.connector.clock.getDelayedCalls(), [])

    def accept(self) -> tuple[LocalProtocol, TCPLikeTransport]:
        local = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = TCPLikeTransport()
        local.makeConnection(transport)
        return local, transport

    def answer(self, response: wire.ConnResponse, after: bytes = b"") -> Any:
        """
        The ingress's answer to the last connection, in one read with
        C{after}; the ingress side's transport.
        """
        ingress = self.connector.connections[-1]
        ingress.dataReceived(wire.encode_response(response) + after)
        return ingress.transport


class UpgradeTests(BridgeTestCase):
    """
    The accepted connection waits, unread, for its ingress leg.
    """

    def test_pausedUntilUpgraded(self) -> None:
        """
        The client is not read from until the ingress has answered; what it
        sent meanwhile follows the request, and reading resumes.
        """
        local, transport = self.accept()
        self.assertEqual(
            (transport.producerState, transport.no_delay), ("paused", True)
        )
        local.dataReceived(b"early")
        ingress = self.answer(wire.ConnResponse("ep_1", "tcp"))
        self.assertEqual(
            ingress.value(),
            wire.encode_request(wire.ConnRequest("db.test", 5432)) + b"early",
        )
        self.assertEqual(transport.producerState, "producing")
        self.assertIs(local.ingress, self.connector.connections[0])

    def test_bytesAfterResponseDelivered(self) -> None:
        """
        Bytes from the backend that arrive in the same read as the response
        frame reach the client.
        """
        _, transport = self.accept()
        self.answer(wire.ConnResponse("ep_1", "tcp"), after=b"greeting")
        self.assertEqual(transport.value(), b"greeting")

    def test_clientLeavesDuringUpgrade(self) -> None:
        """
        A client that leaves before the ingress answers closes the ingress
        connection, and is not counted as an error.
        """
        local, _ = self.accept()
        local.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.connector.connections[0].transport.disconnected)
        stats = self.factory.stats
        self.assertEqual(
            (stats.connections_open, stats.connections_total, stats.errors),
            (0, 1, 0),
        )
        self.assertEqual(self.factory.connections, set())

    def test_clientAbortEndsIngress(self) -> None:
        """
        A client that drops its connection once bridged closes the ingress
        leg, and the bytes each way are counted.
        """
        local, _ = self.accept()
        local.dataReceived(b"1234")
        ingress = self.answer(wire.ConnResponse("ep_1", "tcp"), after=b"123456")
        local.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(ingress.disconnecting)
        stats = self.factory.stats
        self.assertEqual(
            (stats.connections_open, stats.bytes_up, stats.bytes_down), (0, 4, 6)
        )


class HostRewriteTests(BridgeTestCase):
    """
    With a rewrite host set, only connections to an endpoint whose URL says
    HTTP are rewritten, whatever the ingress's answer says: the first
    request may go before the answer.
    """

    rewrite_host = "web.test:8080"
    request = b"GET / HTTP/1.1\r\nHost: 10.107.0.2:8080\r\n\r\n"

    def forwarded(self, url: str, proto: str) -> bytes:
        self.factory.target = parse_endpoint_url(url)
        local, _ = self.accept()
        ingress = self.answer(wire.ConnResponse("ep_1", proto))
        ingress.clear()
        local.dataReceived(self.request)
        return cast(bytes, ingress.value())

    def test_tcpUntouched(self) -> None:
        """
        Bytes on a TCP endpoint pass as sent, even when they look like HTTP
        and the ingress calls the endpoint's protocol HTTP.
        """
        self.assertEqual(self.forwarded("tcp://db.test:8080", "http"), self.request)

    def test_httpRewritten(self) -> None:
        """
        An HTTP endpoint's requests are rewritten, even when the ingress
        calls its protocol something else.
        """
        self.assertEqual(
            self.forwarded("http://web.test:8080", "tcp"),
            b"GET / HTTP/1.1\r\nHost: web.test:8080\r\n\r\n",
        )


class EarlyDataTests(BridgeTestCase):
    """
    With early data, the client's first read goes right behind the request;
    what follows waits for the answer.
    """

    url = "http://web.test"
    rewrite_host = "web.test"
    early_data = True
    request = b"GET / HTTP/1.1\r\nHost: 10.107.0.2\r\n\r\n"
    rewritten = b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"

    def test_firstReadBehindRequest(self) -> None:
        """
        The client is read before the answer; its first read, rewritten,
        follows the request at once, and reading stops until the answer;
        then the client's next bytes follow, and nothing twice.
        """
        local, transport = self.accept()
        self.assertEqual(transport.producerState, "producing")
        local.dataReceived(self.request)
        ingress = self.connector.connections[0].transport
        sent = wire.encode_request(wire.ConnRequest("web.test", 80)) + self.rewritten
        self.assertEqual((ingress.value(), transport.producerState), (sent, "paused"))
        self.answer(wire.ConnResponse("ep_1", "http"))
        self.assertEqual(
            (ingress.value(), transport.producerState), (sent, "producing")
        )
        local.dataReceived(self.request)
        self.assertEqual(ingress.value(), sent + self.rewritten)
        self.assertEqual(local.bytes_received, 2 * len(self.request))

    def test_serverSpeaksFirst(self) -> None:
        """
        A client that waits for the endpoint to speak first (a database's
        greeting) is carried as without early data.
        """
        self.factory.target = parse_endpoint_url("tcp://db.test:5432")
        local, transport = self.accept()
        ingress = self.answer(wire.ConnResponse("ep_1", "tcp"), after=b"greeting")
        self.assertEqual(transport.value(), b"greeting")
        ingress.clear()
        local.dataReceived(b"login")
        self.assertEqual(ingress.value(), b"login")

    def test_badGatewayAfterEarlyData(self) -> None:
        """
        A refusal after the first request went early still gives the client
        a 502 naming ngrok's error, then reads and discards what it sends.
        """
        local, transport = self.accept()
        local.dataReceived(self.request)
        self.answer(REFUSAL)
        head, body = transport.value().split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head)
        self.assertIn(b"ERR_NGROK_3200", body)
        self.assertEqual(
            (transport.write_closed, transport.producerState), (True, "producing")
        )
        local.dataReceived(self.request)
        local.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        local.connectionLost(Failure(ConnectionLost()))


class RefusedTCPTests(BridgeTestCase):
    """
    A TCP client whose connection cannot be carried is disconnected.
    """

    def test_refused(self) -> None:
        """
        A refusal resets the client without a byte (a clean end would pass
        for the endpoint's); the endpoint counts the error with ngrok's
        code.
        """
        local, transport = self.accept()
        local.dataReceived(b"lost")
        self.answer(REFUSAL)
        self.assertEqual((transport.value(), transport.disconnected), (b"", True))
        self.assertEqual(self.factory.stats.errors, 1)
        self.assertIn("ERR_NGROK_3200", self.factory.stats.last_error)


class EarlyRefusedTCPTests(RefusedTCPTests):
    """
    L{RefusedTCPTests} with early data: the client's first bytes went before
    the refusal, and it is reset all the same.
    """

    early_data = True

    def test_noCertificateYet(self) -> None:
        """
        A connection accepted before the daemon has its certificate is
        disconnected, and the reason is kept for status.
        """
        connector = IngressConnector(MemoryReactorClock(), "127.0.0.1", 443, None)
        self.factory.connector = connector
        _, transport = self.accept()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats.last_error, "no client certificate yet")


class RefusedHTTPTests(BridgeTestCase):
    """
    An HTTP client whose connection cannot be carried is told why.
    """

    url = "http://web.test"

    def refused(self) -> tuple[LocalProtocol, TCPLikeTransport]:
        local, transport = self.accept()
        self.answer(REFUSAL)
        return local, transport

    def test_badGateway(self) -> None:
        """
        The client gets a complete 502 naming ngrok's error code and message,
        then the end of the stream.
        """
        local, transport = self.refused()
        head, body = transport.value().split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head)
        self.assertIn(b"ERR_NGROK_3200: endpoint db.test:5432 not found", body)
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        assert length is not None
        self.assertEqual(int(length.group(1)), len(body))
        self.assertTrue(transport.write_closed)
        local.connectionLost(Failure(ConnectionLost()))

    def test_requestReadAndDiscarded(self) -> None:
        """
        The rest of the request is read (closing with unread input would
        reset the connection and lose the answer) and goes nowhere; the
        connection closes when the client is done.
        """
        local, transport = self.refused()
        local.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(
            (transport.producerState, transport.disconnecting), ("producing", False)
        )
        local.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        local.connectionLost(Failure(ConnectionLost()))

    def test_lingerBounded(self) -> None:
        """
        A client that never closes is cut off after C{REJECT_LINGER}
        seconds, not before.
        """
        local, transport = self.refused()
        self.connector.clock.advance(REJECT_LINGER - 0.1)
        self.assertFalse(transport.disconnected)
        self.connector.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        local.connectionLost(Failure(ConnectionLost()))


class DrainTests(BridgeTestCase):
    """
    When the grace of a stop starts, an HTTP connection ends at a response
    boundary; a TCP one carries on.
    """

    url = "http://web.test"
    request = b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def bridged(self, proto: str = "http") -> tuple[LocalProtocol, Any, Any]:
        """
        An accepted connection, upgraded: it, its transport and the
        ingress's.
        """
        local, transport = self.accept()
        ingress = self.answer(wire.ConnResponse("ep_1", proto))
        ingress.clear()
        return local, transport, ingress

    def assertHungUp(self, local: LocalProtocol, transport: Any, ingress: Any) -> None:
        """
        The client got our FIN and is still read (what it sends goes
        nowhere) until it closes; the ingress leg is closed.
        """
        self.assertEqual(
            (transport.write_closed, transport.producerState, ingress.disconnecting),
            (True, "producing", True),
        )
        local.dataReceived(self.request)
        self.assertEqual(ingress.value(), b"")
        local.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.connector.connections[-1].connectionLost(Failure(ConnectionLost()))
        local.connectionLost(Failure(ConnectionLost()))

    def test_idleClosedAtOnce(self) -> None:
        """
        A connection idle between requests is hung up on at once, its last
        response complete.
        """
        local, transport, ingress = self.bridged()
        local.dataReceived(self.request)
        self.assertEqual(ingress.value(), self.request)
        ingress.clear()
        self.connector.connections[-1].dataReceived(self.response)
        self.factory.drain()
        self.assertEqual(transport.value(), self.response)
        self.assertHungUp(local, transport, ingress)

    def test_inFlightAnsweredThenClosed(self) -> None:
        """
        A request in flight is answered in full, the answer saying
        C{Connection: close}, and then the connection is hung up on.
        """
        local, transport, ingress = self.bridged()
        local.dataReceived(self.request)
        ingress.clear()
        self.factory.drain()
        self.assertFalse(transport.write_closed)
        self.connector.connections[-1].dataReceived(self.response)
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )
        self.assertHungUp(local, transport, ingress)

    def test_acceptedBeforeUpgrade(self) -> None:
        """
        A connection still waiting for its ingress leg when the grace starts
        gets its first request answered, then ends.
        """
        local, transport = self.accept()
        self.factory.drain()
        local.dataReceived(self.request)
        ingress = self.answer(wire.ConnResponse("ep_1", "http"))
        self.assertTrue(ingress.value().endswith(self.request))
        ingress.clear()
        self.assertFalse(transport.write_closed)
        self.connector.connections[-1].dataReceived(self.response)
        self.assertIn(b"Connection: close", transport.value())
        self.assertHungUp(local, transport, ingress)

    def test_tcpCarriesOn(self) -> None:
        """
        A TCP connection keeps the grace.
        """
        local, transport, ingress = self.bridged("tcp")
        self.factory.drain()
        local.dataReceived(self.request)
        self.assertEqual(
            (ingress.value(), transport.write_closed), (self.request, False)
        )
        local.connectionLost(Failure(ConnectionLost()))


class EarlyDrainTests(DrainTests):
    """
    L{DrainTests} with early data: a request sent before the answer is the
    one a drain lets through.
    """

    early_data = True


class DialTests(SynchronousTestCase):
    """
    The bridge with the real connector, dialling on a memory reactor.
    """

    def test_clientLeavesDuringDial(self) -> None:
        """
        A client that leaves while the ingress is still being dialled stops
        the dial, and is not counted as an error.
        """
        memory = MemoryReactorClock()
        connector = IngressConnector(
            memory, "127.0.0.1", 443, PartialChainTrust(system=False)
        )
        ca = CertificateAuthority.create("dial test")
        key_pem = generate_key()
        connector.use_certificate(ca.sign_csr(make_csr(key_pem), 1).cert_pem, key_pem)
        factory = BridgeFactory(parse_endpoint_url("http://web.test"), connector, None)
        local = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = TCPLikeTransport()
        local.makeConnection(transport)
        [dial] = memory.connectors
        local.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(dial.stoppedConnecting)
        stats = factory.stats
        self.assertEqual((stats.errors, stats.failures, stats.last_error), (0, {}, ""))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(memory.getDelayedCalls(), [])


class BridgeOverTLSTests(TestCase):
    """
    The bridge to the devcloud's ingress over real mutual TLS on 127.0.0.1.
    """

    timeout = 60

    def setUp(self) -> None:
        harness = devcloud_ingress(self)
        self.cloud, self.connector = harness.cloud, harness.connector
        self.ingress = harness.ingress

    def bridge(self, url: str) -> tuple[BridgeFactory, int]:
        """
        A bridge for C{url} listening on 127.0.0.1 for this test, and its
        port.
        """
        factory = BridgeFactory(parse_endpoint_url(url), self.connector, None)
        return factory, listen(factory, self)

    def sent_first(self, bridge: BridgeFactory, port: int, data: bytes) -> Recorder:
        """
        A client of C{bridge} whose C{data} is sent before the daemon
        accepts its connection (as a client that writes once connected can
        be); it records what it gets back, and is gone from the bridge when
        the test ends.
        """
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(data)
            client = Recorder()
            factory: Any = Factory.forProtocol(lambda: client)
            adopt = cast(IReactorSocket, reactor).adoptStreamConnection
            adopt(sock.fileno(), socket.AF_INET, factory)

        async def gone() -> None:
            if client.reason is None:
                client.transport.abortConnection()
            await wait_until(lambda: not bridge.connections, "the bridge's end")

        self.addCleanup(lambda: ensureDeferred(gone()))
        return client

    def echo(self, url: str) -> None:
        """
        Bind C{url} to an echo server.
        """
        backend = listen(Factory.forProtocol(Echo), self)
        self.cloud.add_endpoint(url, ("127.0.0.1", backend))

    async def test_firstBytesGoBeforeTheAnswer(self) -> None:
        """
        The client's first bytes reach the ingress before it answers: an
        ingress that never answers still gets them.
        """
        self.echo(ECHO)
        self.ingress.inject(ECHO, IngressFault(stall=True))
        bridge, port = self.bridge(ECHO)
        self.sent_first(bridge, port, b"hello")
        await wait_until(lambda: self.ingress.early_bytes_total == 5, "early bytes")
        self.assertEqual(self.ingress.upgrades_total, 0)
        await self.ingress.close_all()  # (else the client waits for the timeout)

    async def test_earlyDataReachesTheBackend(self) -> None:
        """
        Bytes sent before the answer reach the backend once, before what
        follows them, and its answers come back.
        """
        self.echo(ECHO)
        bridge, port = self.bridge(ECHO)
        client = self.sent_first(bridge, port, b"hello")
        await wait_until(lambda: client.received == b"hello", "the echo")
        client.transport.write(b" world")
        client.transport.loseWriteConnection()
        await client.lost
        self.assertEqual(client.received, b"hello world")

    async def test_refusedAfterEarlyDataHTTP(self) -> None:
        """
        An HTTP client whose request went behind a request the ingress
        refuses gets a 502 naming ngrok's error, as without early data.
        """
        bridge, port = self.bridge("http://web.test")  # bound to nothing
        request = b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"
        client = self.sent_first(bridge, port, request)
        await client.lost
        await wait_until(lambda: not bridge.connections, "the bridge's end")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"ERR_NGROK_3200", client.received)
        self.assertEqual(bridge.stats.bytes_up, len(request))  # read before it

    async def test_refusedAfterEarlyDataTCP(self) -> None:
        """
        A TCP client whose first bytes went behind a request the ingress
        refuses is reset, not closed as if the endpoint had finished.
        """
        bridge, port = self.bridge("tcp://db.test:5432")  # bound to nothing
        client = self.sent_first(bridge, port, b"startup")
        await client.lost
        await wait_until(lambda: not bridge.connections, "the bridge's end")
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionLost), client.reason)
        self.assertEqual(client.received, b"")
        self.assertEqual(bridge.stats.bytes_up, 7)  # read before the answer
        self.assertIn("ERR_NGROK_3200", bridge.stats.last_error)

    async def test_slowBackend(self) -> None:
        """
        A backend that does not read makes the local client wait instead of
        making the daemon buffer: the bridge holds under 512 KiB for it, and
        every byte arrives once the backend reads again.
        """
        backend = Counter(on_connected=lambda p: p.transport.pauseProducing())
        backend_port = listen(Factory.forProtocol(lambda: backend), self)
        url = "tcp://bulk.test:9"
        self.cloud.add_endpoint(url, ("127.0.0.1", backend_port))
        factory = BridgeFactory(parse_endpoint_url(url), self.connector, None)
        source = Source(64 * 1024 * 1024)
        await connect(listen(factory, self), source)
        await wait_until(lambda: backend.transport is not None, "the backend leg")
        await assert_flow_controlled(self, source, factory, backend)
        self.assertTrue(backend.read_closed)
