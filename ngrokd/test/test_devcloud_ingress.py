"""
Tests for L{ngrokd.devcloud.ingress}: real mutual TLS and real backends on
loopback, plus a memory reactor for what loopback cannot stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL.SSL import Error as TLSError
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ngrokd.datapath import wire
from ngrokd.datapath.halfclose import HalfCloseableTLSClientEndpoint
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud, InvalidEndpointURL
from ngrokd.devcloud.ingress import (
    CONNECT_TIMEOUT,
    ERR_ENDPOINT_NOT_FOUND,
    ERR_NOT_AN_OPERATOR,
    ERR_UPSTREAM_FAILED,
    MAX_REQUEST_SIZE,
    REQUEST_TIMEOUT,
    FaultError,
    IngressFactory,
    IngressFault,
    server_options,
    tls_factory,
)
from ngrokd.ngrok.trust import PartialChainTrust, client_creator
from ngrokd.pem import parse_certificates
from ngrokd.test.helpers import Recorder

#: The real reactor, for loopback I/O (untyped: it provides many interfaces).
reactor: Any = _reactor


def new_csr() -> tuple[bytes, bytes]:
    """
    A key and CSR as ngrokd makes them (empty subject), both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def register(cloud: Cloud) -> tuple[ssl.PrivateCertificate, str]:
    """
    Register an operator with C{cloud}, as ngrokd does through the API; its
    binding certificate with the key, and the operator id.
    """
    key_pem, csr_pem = new_csr()
    operator = cloud.register(
        "test", "{}", ["bindings"], "global", {"name": "t"}, ["true"], csr_pem
    )
    certificate = ssl.PrivateCertificate.loadPEM(operator.cert.cert_pem + key_pem)
    return certificate, operator.id


def foreign_certificate() -> ssl.PrivateCertificate:
    """
    A binding-style certificate from a CA the cloud does not know.
    """
    key_pem, csr_pem = new_csr()
    issued = CertificateAuthority.create("someone else").sign_csr(csr_pem, 1)
    return ssl.PrivateCertificate.loadPEM(issued.cert_pem + key_pem)


def split_response(data: bytes) -> tuple[wire.ConnResponse, bytes]:
    got = wire.FrameReader().feed(data)
    if got is None:
        raise AssertionError(f"no complete ConnResponse in {data!r}")
    payload, rest = got
    return wire.decode_response(payload), rest


@implementer(IHandshakeListener)
class Peer(Recorder):
    """
    L{Recorder}, which can also echo, tell when its TLS handshake is done,
    and wait for a number of bytes.
    """

    def __init__(
        self,
        on_connected: Callable[[Any], object] | None = None,
        on_read_closed: Callable[[Any], object] | None = None,
        echo: bool = False,
    ) -> None:
        super().__init__(on_read_closed=on_read_closed, on_connected=on_connected)
        self.handshake: Deferred[None] = Deferred()
        self._echo = echo
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def receivedAtLeast(self, count: int) -> Deferred[bytes]:
        """
        Fires with everything received once there are C{count} bytes; fails
        if the connection ends first.
        """
        d: Deferred[bytes] = Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def _check(self) -> None:
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        for entry in ready:
            self._waiting.remove(entry)
            entry[1].callback(self.received)

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._echo:
            self.transport.write(data)
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        waiting, self._waiting = self._waiting, []
        for count, d in waiting:
            d.errback(
                AssertionError(f"closed with {self.received!r}, wanted {count} bytes")
            )
        super().connectionLost(reason)


class IngressTests(TestCase):
    """
    The ingress over real TLS to real backends, on 127.0.0.1.
    """

    timeout = 15

    def setUp(self) -> None:
        self.ca = CertificateAuthority.create("devcloud test root")
        intermediate = self.ca.intermediate("Intermediate CA")
        cert, key = intermediate.issue_server(["localhost", "127.0.0.1"])
        self.clock = Clock()
        self.cloud = Cloud(self.ca, ["key"], "localhost:443")
        self.ingress = IngressFactory(self.cloud, reactor, clock=self.clock)
        port = reactor.listenTCP(
            0,
            tls_factory(self.ingress, server_options(cert, key, self.ca.cert_pem)),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.trust = PartialChainTrust(
            parse_certificates(intermediate.chain_pem, "intermediate"), system=False
        )
        self.certificate, self.operator_id = register(self.cloud)
        self.backends: list[Peer] = []

    def backend(self, **behaviour) -> int:
        """
        Listen on 127.0.0.1 with a fresh L{Peer} per connection; returns the
        port.
        """

        def build() -> Peer:
            peer = Peer(**behaviour)
            self.backends.append(peer)
            return peer

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def bind(self, url: str, backend: int) -> str:
        """
        Bind C{url} to a backend port on 127.0.0.1; returns the endpoint id.
        """
        return self.cloud.add_endpoint(url, ("127.0.0.1", backend)).id

    @inlineCallbacks
    def connect(self, peer: Peer, certificate=None, hostname="localhost"):
        if certificate is None:
            certificate = self.certificate
        creator = client_creator(hostname, self.trust, certificate or None)
        endpoint = HalfCloseableTLSClientEndpoint(
            creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        )
        yield endpoint.connect(Factory.forProtocol(lambda: peer))
        self.addCleanup(self.closeAll, peer)
        return peer

    @inlineCallbacks
    def closeAll(self, client: Peer):
        if client.reason is None:
            client.transport.abortConnection()
        yield client.lost
        for backend in self.backends:
            if backend.reason is None:
                backend.transport.abortConnection()
            yield backend.lost

    def request(self, host: str, port: int) -> bytes:
        return wire.encode_request(wire.ConnRequest(host=host, port=port))

    def serverSideClosed(self) -> Deferred[Any]:
        """
        Fires once every connection the ingress accepted is closed on its
        side too (a leak shows as this test's timeout).
        """
        return DeferredList([p.closed for p in self.ingress.active])

    @inlineCallbacks
    def test_upgradeCarriesBytesBothWays(self):
        """
        A request for a bound endpoint is answered with its id and proto, the
        bytes sent in the same write as the request reach the backend, and
        the pipe then carries bytes both ways.
        """
        endpoint_id = self.bind("tcp://db.prod:5432", self.backend(echo=True))
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432) + b"hello")
        expected = wire.ConnResponse(endpoint_id, "tcp")
        head = len(wire.encode_response(expected))
        received = yield client.receivedAtLeast(head + 5)
        self.assertEqual(split_response(received), (expected, b"hello"))
        client.transport.write(b" world")
        received = yield client.receivedAtLeast(head + 11)
        self.assertEqual(split_response(received)[1], b"hello world")
        self.assertEqual(self.backends[0].received, b"hello world")
        self.assertEqual(
            (self.ingress.connections_total, self.ingress.upgrades_total), (1, 1)
        )

    @inlineCallbacks
    def test_defaultPortAndCase(self):
        """
        An http endpoint bound without a port answers requests for port 80,
        whatever the case of the requested host.
        """
        endpoint_id = self.bind("http://web.prod", self.backend())
        client = yield self.connect(Peer())
        client.transport.write(self.request("Web.Prod", 80))
        expected = wire.ConnResponse(endpoint_id, "http")
        received = yield client.receivedAtLeast(len(wire.encode_response(expected)))
        self.assertEqual(split_response(received), (expected, b""))

    @inlineCallbacks
    def test_unknownEndpointRefused(self):
        """
        A request for a host and port nobody bound is refused with
        ERR_NGROK_3200 naming them, and the ingress closes the connection.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5433) + b"dropped")
        yield client.lost
        response, rest = split_response(client.received)
        self.assertEqual((response.error_code, rest), (ERR_ENDPOINT_NOT_FOUND, b""))
        self.assertIn("db.prod:5433", response.error_message)
        self.assertEqual(self.backends, [])
        yield self.serverSideClosed()

    @inlineCallbacks
    def test_removedEndpointRefused(self):
        """
        Once an endpoint is removed from the cloud, new connections for it
        are refused.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        self.cloud.remove_endpoint("tcp://db.prod:5432")
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432))
        yield client.lost
        response = split_response(client.received)[0]
        self.assertEqual(response.error_code, ERR_ENDPOINT_NOT_FOUND)

    @inlineCallbacks
    def test_backendDownRefused(self):
        """
        When the endpoint's backend refuses the connection, the client gets
        ERR_NGROK_8012 naming the backend, not a success.
        """
        port = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        closed = port.getHost().port
        yield port.stopListening()
        self.bind("tcp://db.prod:5432", closed)
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432) + b"lost?")
        yield client.lost
        response, rest = split_response(client.received)
        self.assertEqual((response.error_code, rest), (ERR_UPSTREAM_FAILED, b""))
        self.assertIn(f"127.0.0.1:{closed}", response.error_message)
        self.assertEqual(self.ingress.upgrades_total, 0)
        yield self.serverSideClosed()

    @inlineCallbacks
    def assertRefusedAtTLS(self, certificate):
        client = Peer()
        yield self.connect(client, certificate=certificate)
        client.transport.write(self.request("db.prod", 5432))
        yield client.lost
        self.assertEqual(client.received, b"")
        assert client.reason is not None
        self.assertTrue(client.reason.check(TLSError), client.reason)
        self.assertEqual(self.backends, [])

    def test_clientWithoutCertificateRefused(self):
        """
        A client that presents no certificate is refused during TLS.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        return self.assertRefusedAtTLS(False)

    def test_certificateFromAnotherCARefused(self):
        """
        A client certificate issued by another CA is refused during TLS.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        return self.assertRefusedAtTLS(foreign_certificate())

    @inlineCallbacks
    def test_deletedOperatorRefused(self):
        """
        The certificate of an operator that was deleted is refused with
        ERR_NGROK_107, before any endpoint is looked at.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        self.cloud.delete_operator(self.operator_id)
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432))
        yield client.lost
        response = split_response(client.received)[0]
        self.assertEqual(response.error_code, ERR_NOT_AN_OPERATOR)
        self.assertEqual(self.backends, [])

    @inlineCallbacks
    def test_clientHalfClose(self):
        """
        A client that stops sending (close_notify) makes the backend see EOF;
        the backend's later answer still reaches the client.
        """

        def answer(backend: Peer) -> None:
            backend.transport.write(b"pong:" + backend.received)
            backend.transport.loseConnection()

        self.bind("tcp://db.prod:5432", self.backend(on_read_closed=answer))
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432) + b"ping")
        client.transport.loseWriteConnection()
        yield client.lost
        response, rest = split_response(client.received)
        self.assertEqual((response.error_code, rest), ("", b"pong:ping"))
        self.assertTrue(self.backends[0].read_closed)
        assert client.reason is not None
        client.reason.trap(ConnectionDone)

    @inlineCallbacks
    def test_backendHalfClose(self):
        """
        A backend that stops sending (FIN) makes the client see the end of
        the stream while it can still send to the backend.
        """

        def greet(backend: Peer) -> None:
            backend.transport.write(b"hello")
            backend.transport.loseWriteConnection()

        def thank(client: Peer) -> None:
            client.transport.write(b"thanks")
            client.transport.loseWriteConnection()

        self.bind("tcp://db.prod:5432", self.backend(on_connected=greet))
        client = yield self.connect(Peer(on_read_closed=thank))
        client.transport.write(self.request("db.prod", 5432))
        yield client.lost
        self.assertTrue(client.read_closed)
        self.assertEqual(split_response(client.received)[1], b"hello")
        backend = self.backends[0]
        yield backend.lost
        self.assertEqual((backend.received, backend.read_closed), (b"thanks", True))

    @inlineCallbacks
    def test_bothLegsNoDelay(self):
        """
        Nagle is off on the client leg and on the backend leg, so small
        interactive writes are not delayed.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432))
        yield client.receivedAtLeast(3)
        [server] = self.ingress.active
        assert server.peer is not None
        self.assertTrue(server.transport.getTcpNoDelay())
        self.assertTrue(server.peer.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_requestTimeout(self):
        """
        A client that completes TLS but sends only part of its request is
        disconnected when the request timeout passes, not before.
        """
        client = yield self.connect(Peer())
        yield client.handshake
        client.transport.write(self.request("db.prod", 5432)[:3])
        self.clock.advance(REQUEST_TIMEOUT - 1)
        self.assertEqual(len(self.ingress.active), 1)
        self.clock.advance(1)
        yield client.lost
        self.assertEqual(client.received, b"")

    @inlineCallbacks
    def test_oversizedRequestClosed(self):
        """
        A frame longer than the largest accepted request is not buffered to
        its end: the connection is closed without an answer.
        """
        client = yield self.connect(Peer())
        client.transport.write(b"\xff\xff" + b"\x00" * (MAX_REQUEST_SIZE + 1))
        yield client.lost
        self.assertEqual(client.received, b"")
        yield self.serverSideClosed()

    @inlineCallbacks
    def test_malformedRequestClosed(self):
        """
        A frame that is not a ConnRequest closes the connection unanswered.
        """
        client = yield self.connect(Peer())
        client.transport.write(wire.frame(b"\xff\xff\xff"))
        yield client.lost
        self.assertEqual(client.received, b"")

    @inlineCallbacks
    def test_injectedNotices(self):
        """
        Notices injected for an endpoint come with its successful response.
        """
        endpoint_id = self.bind("http://web.prod", self.backend())
        self.ingress.inject("http://web.prod", IngressFault(notices=("slow down",)))
        client = yield self.connect(Peer())
        client.transport.write(self.request("web.prod", 80))
        expected = wire.ConnResponse(endpoint_id, "http", notices=("slow down",))
        received = yield client.receivedAtLeast(len(wire.encode_response(expected)))
        self.assertEqual(split_response(received), (expected, b""))

    @inlineCallbacks
    def test_injectedRefusal(self):
        """
        An injected error replaces the answer for a bound endpoint, without
        connecting to its backend; removing it restores the endpoint.
        """
        self.bind("http://web.prod", self.backend())
        fault = IngressFault(error_code="ERR_NGROK_1", error_message="no")
        self.ingress.inject("http://web.prod:80", fault)
        client = yield self.connect(Peer())
        client.transport.write(self.request("web.prod", 80))
        yield client.lost
        response = split_response(client.received)[0]
        self.assertEqual(
            (response.error_code, response.error_message), ("ERR_NGROK_1", "no")
        )
        self.assertEqual(self.backends, [])
        self.ingress.inject("http://web.prod", None)
        self.assertEqual(self.ingress.faults, {})

    @inlineCallbacks
    def test_injectedHangUp(self):
        """
        An injected hang-up closes the connection after the request, with no
        response at all.
        """
        self.bind("http://web.prod", self.backend())
        self.ingress.inject("http://web.prod", IngressFault(hang_up=True))
        client = yield self.connect(Peer())
        client.transport.write(self.request("web.prod", 80) + b"dropped")
        yield client.lost
        self.assertEqual((client.received, self.backends), (b"", []))
        yield self.serverSideClosed()

    @inlineCallbacks
    def test_injectedStall(self):
        """
        A stalled connection is never answered, and is closed when the
        client gives up.
        """
        self.bind("http://web.prod", self.backend())
        self.ingress.inject("http://web.prod", IngressFault(stall=True))
        client = yield self.connect(Peer())
        client.transport.write(self.request("web.prod", 80) + b"more")
        client.transport.loseConnection()
        yield client.lost
        yield self.serverSideClosed()
        self.assertEqual((client.received, self.backends), (b"", []))

    @inlineCallbacks
    def test_closeAll(self):
        """
        C{close_all} ends every open connection, the spliced backend's too.
        """
        self.bind("tcp://db.prod:5432", self.backend())
        client = yield self.connect(Peer())
        client.transport.write(self.request("db.prod", 5432))
        yield client.receivedAtLeast(3)
        yield self.ingress.close_all()
        yield client.lost
        yield self.backends[0].lost
        self.assertEqual(self.ingress.active, set())


class IngressFaultTests(SynchronousTestCase):
    def test_oneAnswerOnly(self):
        """
        A fault cannot both refuse and stall, or stall and hang up.
        """
        self.assertRaises(FaultError, IngressFault, error_code="E", stall=True)
        self.assertRaises(FaultError, IngressFault, stall=True, hang_up=True)

    def test_badURL(self):
        """
        Injecting for a URL that names no endpoint address is refused.
        """
        ingress = IngressFactory(
            Cloud(CertificateAuthority.create("ca"), [], "x:1"), MemoryReactorClock()
        )
        self.assertRaises(
            InvalidEndpointURL, ingress.inject, "tcp://db.prod", IngressFault()
        )


class PeerCertificateTransport(StringTransport):
    """
    A transport whose peer presented C{certificate}, as TLS would show it.
    """

    def __init__(self, certificate: ssl.PrivateCertificate | None) -> None:
        super().__init__()
        self._certificate = certificate

    def getPeerCertificate(self):
        return self._certificate.original if self._certificate else None


class IngressMemoryTests(SynchronousTestCase):
    """
    What loopback cannot stage: a backend that has not answered yet.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.cloud = Cloud(CertificateAuthority.create("ca"), [], "localhost:443")
        self.endpoint = self.cloud.add_endpoint(
            "tcp://db.prod:5432", ("127.0.0.1", 6000)
        )
        self.ingress = IngressFactory(self.cloud, self.reactor)
        self.protocol = self.ingress.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = PeerCertificateTransport(register(self.cloud)[0])
        self.protocol.makeConnection(self.transport)
        self.request = wire.encode_request(wire.ConnRequest("db.prod", 5432))

    def test_responseWaitsForTheBackend(self):
        """
        Nothing is answered until the backend connection exists; then the
        response goes out and the bytes that came before it (with the
        request, and in a later read) reach the backend, counted as early
        data; bytes after the answer are not.
        """
        self.protocol.dataReceived(self.request + b"early")
        self.protocol.dataReceived(b" more")
        self.assertEqual(self.transport.value(), b"")
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 6000, CONNECT_TIMEOUT))
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert backend is not None
        backendTransport = StringTransport()
        backend.makeConnection(backendTransport)
        self.assertEqual(
            (split_response(self.transport.value()), backendTransport.value()),
            ((wire.ConnResponse(self.endpoint.id, "tcp"), b""), b"early more"),
        )
        self.protocol.dataReceived(b"after")
        self.assertEqual(backendTransport.value(), b"early moreafter")
        self.assertEqual(self.ingress.early_bytes_total, len(b"early more"))

    def test_clientLeavesWhileConnecting(self):
        """
        A client that goes away while the backend connection is pending
        cancels that connection attempt and is never answered.
        """
        self.protocol.dataReceived(self.request)
        [connector] = self.reactor.connectors
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.ingress.active, set())

    def test_noCertificateRefused(self):
        """
        Served without TLS client authentication, a client without a
        certificate is still refused, with ERR_NGROK_107.
        """
        protocol = self.ingress.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        transport = PeerCertificateTransport(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.request)
        response = split_response(transport.value())[0]
        self.assertEqual(response.error_code, ERR_NOT_AN_OPERATOR)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_stallNeverAnswers(self):
        """
        An injected stall reads the request and answers nothing, however
        long the client waits; the request timer no longer applies.
        """
        self.ingress.inject("tcp://db.prod:5432", IngressFault(stall=True))
        self.protocol.dataReceived(self.request)
        self.reactor.advance(REQUEST_TIMEOUT * 10)
        self.assertEqual(
            (self.transport.value(), self.transport.disconnecting),
            (b"", False),
        )
        self.assertEqual(self.reactor.tcpClients, [])
