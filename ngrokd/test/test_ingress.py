"""
Tests for L{ngrokd.datapath.ingress}, L{ngrokd.datapath.upgrade},
L{ngrokd.datapath.resumption}, L{ngrokd.datapath.earlydata} and
L{ngrokd.ngrok.trust}: whom the connector trusts, and which TLS sessions it
resumes, over real TLS on loopback; where early data goes.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from attrs import frozen
from OpenSSL.SSL import Context
from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import UserError
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.datapath import wire
from ngrokd.datapath.earlydata import EarlyData
from ngrokd.datapath.halfclose import HalfCloseableTLSFactory, HalfCloseableTLSProtocol
from ngrokd.datapath.ingress import DialFailed, IngressConnector
from ngrokd.datapath.resumption import HandshakeCounts
from ngrokd.datapath.splice import PipeProtocol, splice
from ngrokd.datapath.upgrade import TLSFailed, UpgradeFailed, UpgradeTimeout
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.ingress import server_options
from ngrokd.devcloud.tap import start_devcloud
from ngrokd.ngrok.api import APIUnavailable, make_api
from ngrokd.ngrok.identity import generate_key, make_csr
from ngrokd.ngrok.trust import (
    LateTrustPolicy,
    PartialChainTrust,
    load_api_trust,
    load_ingress_trust,
)
from ngrokd.pem import parse_certificates
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    TCPLikeTransport,
    connect,
    listen,
    wait_until,
)
from ngrokd.test.test_devcloud_ingress import new_csr


class EarlyDataTests(SynchronousTestCase):
    """
    The client's first bytes follow a request, and only while it is not
    answered.
    """

    def test_waitsForTheRequest(self) -> None:
        """
        Bytes offered before a request is written go right behind it.
        """
        early, written = EarlyData(), list[bytes]()
        early.offer(b"first")
        self.assertFalse(early.sent)
        early.follow(written.append)
        early.offer(b"second")
        self.assertEqual((written, early.sent), ([b"first", b"second"], True))

    def test_retryTakesWhatIsLeft(self) -> None:
        """
        After a request failed with nothing sent, bytes offered meanwhile go
        behind the next one (the retry) and not on the failed connection.
        """
        early, failed, retry = EarlyData(), list[bytes](), list[bytes]()
        early.follow(failed.append)
        early.stop()
        early.offer(b"first")
        self.assertFalse(early.sent)
        early.follow(retry.append)
        self.assertEqual((failed, retry, early.sent), ([], [b"first"], True))


class Answer(Protocol):
    """
    A stand-in ingress that answers any request with C{reply}.
    """

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.reply)  # type: ignore[union-attr]


@frozen
class WithoutPartialChain(PartialChainTrust):
    """
    Trusts C{certificates} the way plain OpenSSL does: only self-signed
    roots may be anchors.
    """

    def add_to_context(self, context: Context) -> None:
        store = context.get_cert_store()
        assert store is not None
        for certificate in self.certificates:
            store.add_cert(certificate)


def trusting(ca: CertificateAuthority) -> PartialChainTrust:
    """
    Trust C{ca} alone.
    """
    return PartialChainTrust(parse_certificates(ca.cert_pem, "test"), system=False)


def memory_connector(
    memory: MemoryReactorClock,
    connect_timeout: float = 10.0,
    upgrade_timeout: float = 10.0,
) -> IngressConnector:
    """
    A connector to 127.0.0.1:443 that dials through C{memory}, with a
    client certificate.
    """
    connector = IngressConnector(
        memory,
        "127.0.0.1",
        443,
        PartialChainTrust(system=False),
        connect_timeout,
        upgrade_timeout,
    )
    ca = CertificateAuthority.create("memory connector")
    key_pem = generate_key()
    connector.use_certificate(ca.sign_csr(make_csr(key_pem), 1).cert_pem, key_pem)
    return connector


class ConnectBudgetTests(SynchronousTestCase):
    """
    C{ingress.connect_timeout} is one budget for TCP and TLS together.
    """

    def test_tlsGetsWhatTCPLeft(self) -> None:
        """
        A TCP connect that took 7 of 10 seconds leaves the TLS handshake 3:
        the dial fails 10 seconds after it began, not 17.
        """
        memory = MemoryReactorClock()
        connector = memory_connector(memory)
        dialling = connector.connect(wire.ConnRequest("svc.ns", 80))
        [(_, _, factory, tcp_timeout, _)] = memory.tcpClients
        self.assertEqual(tcp_timeout, 10.0)
        memory.advance(7)
        tcp = factory.buildProtocol(None)
        assert tcp is not None
        tcp.makeConnection(TCPLikeTransport())
        memory.advance(2)
        self.assertNoResult(dialling)
        memory.advance(1)
        failure = self.failureResultOf(dialling, UpgradeTimeout)
        self.assertIn("TLS handshake", failure.getErrorMessage())
        self.assertEqual(memory.getDelayedCalls(), [])


class UpgradeTimeoutTests(SynchronousTestCase):
    """
    After the TLS handshake, the ingress has C{upgrade_timeout} to answer.
    """

    def dial(self, connect_timeout: float, upgrade_timeout: float) -> Any:
        memory = MemoryReactorClock()
        connector = memory_connector(memory, connect_timeout, upgrade_timeout)
        dialling = connector.connect(wire.ConnRequest("svc.ns", 80))
        [(_, _, factory, _, _)] = memory.tcpClients
        tls = factory.buildProtocol(None)
        assert isinstance(tls, HalfCloseableTLSProtocol)
        tls.makeConnection(TCPLikeTransport())
        memory.advance(1)
        tls.wrappedProtocol.handshakeCompleted()  # as TLS says once done
        return memory, dialling

    def assertAnswerAwaited(self, memory: Any, dialling: Any, seconds: float) -> None:
        memory.advance(seconds - 0.5)
        self.assertNoResult(dialling)
        memory.advance(0.5)
        failure = self.failureResultOf(dialling, UpgradeTimeout)
        self.assertEqual(
            failure.getErrorMessage(), "no upgrade response from the ingress in time"
        )
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_longerThanTheHandshakeLeft(self) -> None:
        """
        An upgrade timeout longer than what the handshake had left runs in
        full from the end of the handshake.
        """
        memory, dialling = self.dial(10.0, 30.0)
        self.assertAnswerAwaited(memory, dialling, 30.0)

    def test_shorterThanTheHandshakeLeft(self) -> None:
        """
        A shorter one too: the handshake's time left does not carry over.
        """
        memory, dialling = self.dial(10.0, 2.0)
        self.assertAnswerAwaited(memory, dialling, 2.0)


class _FailingWhenStopped:
    """
    A connector that, like Twisted's, fails its connect at once when it is
    stopped.
    """

    def __init__(self, factory: ClientFactory) -> None:
        self.factory = factory

    def stopConnecting(self) -> None:
        self.factory.clientConnectionFailed(self, Failure(UserError()))  # type: ignore[arg-type]


class _ConnectingReactor(MemoryReactorClock):
    """
    A memory reactor whose connects stay under way until stopped.
    """

    def connectTCP(
        self, host: str, port: int, factory: ClientFactory, *args: Any, **kw: Any
    ) -> Any:
        super().connectTCP(host, port, factory, *args, **kw)
        return _FailingWhenStopped(factory)


class DialCancelTests(SynchronousTestCase):
    """
    A dial given up while TCP connects ends as cancelled, not as a failure
    of the ingress.
    """

    def test_cancelWhileConnecting(self) -> None:
        """
        Cancelling a connection whose TCP connect is under way fails it with
        L{CancelledError} (nothing to report), and frees its turn to dial.
        """
        memory = _ConnectingReactor()
        connector = memory_connector(memory)
        dialling = connector.connect(wire.ConnRequest("svc.ns", 80))
        dialling.cancel()
        self.failureResultOf(dialling, CancelledError)
        self.assertEqual(connector.queue.running, 0)


class ConnectorTrustTests(TestCase):
    """
    The connector checks the ingress's certificate: chain and name.
    """

    timeout = 20

    def setUp(self) -> None:
        self.root = CertificateAuthority.create("root")
        self.intermediate = self.root.intermediate("Intermediate CA")
        key_pem = generate_key()
        self.client_cert = self.root.sign_csr(make_csr(key_pem), days=1).cert_pem
        self.client_key = key_pem

    def serve(self, ca: CertificateAuthority, names: list[str], reply: bytes) -> int:
        cert, key = ca.issue_server(names)
        options = ssl.PrivateCertificate.loadPEM(cert + key).options()
        factory = HalfCloseableTLSFactory(
            options, False, Factory.forProtocol(lambda: Answer(reply))
        )
        return listen(factory, self)

    def connector(self, port: int, trust: Any) -> IngressConnector:
        connector = IngressConnector(reactor, "127.0.0.1", port, trust, 5.0, 5.0)
        connector.use_certificate(self.client_cert, self.client_key)
        return connector

    def test_wrongName(self) -> Deferred[None]:
        """
        A certificate from a trusted CA for another name is refused.
        """

        async def run() -> None:
            port = self.serve(self.root, ["elsewhere.test"], b"")
            connector = self.connector(port, trusting(self.root))
            with self.assertRaises(TLSFailed) as caught:
                await connector.connect(wire.ConnRequest("svc.ns", 80))
            self.assertEqual(
                str(caught.exception),
                "the ingress's certificate is not for 127.0.0.1",
            )

        return ensureDeferred(run())

    def test_untrustedIssuer(self) -> Deferred[None]:
        """
        A certificate for the right name from an unknown CA is refused.
        """

        async def run() -> None:
            stranger = CertificateAuthority.create("stranger")
            port = self.serve(stranger, ["127.0.0.1"], b"")
            connector = self.connector(port, trusting(self.root))
            with self.assertRaises(TLSFailed) as caught:
                await connector.connect(wire.ConnRequest("svc.ns", 80))
            self.assertIn("certificate verify failed", str(caught.exception))

        return ensureDeferred(run())

    def test_intermediateAnchor(self) -> Deferred[None]:
        """
        Trusting only the intermediate, as with ngrok's private CA, is enough;
        plain OpenSSL trust of the same certificate is not.
        """

        async def run() -> None:
            reply = wire.encode_response(
                wire.ConnResponse(endpoint_id="ep_1", proto="tcp")
            )
            port = self.serve(self.intermediate, ["127.0.0.1"], reply)
            anchor = parse_certificates(self.intermediate.cert_pem, "intermediate")
            upgraded = await self.connector(
                port, PartialChainTrust(anchor, system=False)
            ).connect(wire.ConnRequest("svc.ns", 80))
            response = upgraded.response
            assert response is not None
            self.assertEqual((response.error_code, response.proto), ("", "tcp"))
            upgraded.transport.abortConnection()
            with self.assertRaises(TLSFailed):
                await self.connector(
                    port, WithoutPartialChain(anchor, system=False)
                ).connect(wire.ConnRequest("svc.ns", 80))

        return ensureDeferred(run())

    def test_bytesAfterResponseKept(self) -> Deferred[None]:
        """
        Application bytes that arrive in the same read as the response frame
        reach the local client once the two are spliced.
        """

        async def run() -> None:
            reply = wire.encode_response(wire.ConnResponse("ep_1", "tcp")) + b"early"
            port = self.serve(self.root, ["127.0.0.1"], reply)
            upgraded = await self.connector(port, trusting(self.root)).connect(
                wire.ConnRequest("svc.ns", 80)
            )
            local = PipeProtocol()
            client = Recorder()
            await connect(listen(Factory.forProtocol(lambda: local), self), client)
            await wait_until(lambda: local.transport is not None, "the local side")
            splice(local, upgraded)
            await wait_until(lambda: client.received == b"early", "the early bytes")
            client.transport.loseConnection()
            await upgraded.closed

        return ensureDeferred(run())

    def test_malformedResponse(self) -> Deferred[None]:
        """
        An answer that is not a ConnResponse fails the upgrade.
        """

        async def run() -> None:
            port = self.serve(self.root, ["127.0.0.1"], b"\x03\x00\xff\xff\xff")
            connector = self.connector(port, trusting(self.root))
            with self.assertRaises(UpgradeFailed):
                await connector.connect(wire.ConnRequest("svc.ns", 80))

        return ensureDeferred(run())

    def test_dialFailed(self) -> Deferred[None]:
        """
        A port nobody listens on is a dial failure naming the address.
        """

        async def run() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            connector = self.connector(port, trusting(self.root))
            with self.assertRaises(DialFailed) as caught:
                await connector.connect(wire.ConnRequest("svc.ns", 80))
            self.assertIn(f"127.0.0.1:{port}", str(caught.exception))

        return ensureDeferred(run())


class ResumptionTests(TestCase):
    """
    Connections to the ingress resume the TLS session of the last one, over
    real TLS on loopback against the devcloud's TLS settings.
    """

    timeout = 20

    def setUp(self) -> None:
        self.root = CertificateAuthority.create("root")
        self.server_cert, self.server_key = self.root.issue_server(
            ["127.0.0.1", "localhost"]
        )
        self.reply = wire.encode_response(wire.ConnResponse("ep_1", "tcp"))
        self.port = self.serve()

    def serve(self) -> int:
        options = server_options(
            self.server_cert + self.root.chain_pem, self.server_key
        )
        factory = HalfCloseableTLSFactory(
            options, False, Factory.forProtocol(lambda: Answer(self.reply))
        )
        return listen(factory, self)

    def connector(self, trust: Any, host: str = "127.0.0.1") -> IngressConnector:
        connector = IngressConnector(reactor, host, self.port, trust, 5.0, 5.0)
        key_pem = generate_key()
        connector.use_certificate(
            self.root.sign_csr(make_csr(key_pem), days=1).cert_pem, key_pem
        )
        return connector

    async def upgrade(self, connector: IngressConnector) -> None:
        upgraded = await connector.connect(wire.ConnRequest("svc.ns", 80))
        upgraded.transport.abortConnection()
        await upgraded.closed

    def test_secondConnectionResumes(self) -> Deferred[None]:
        """
        The first connection pays a full handshake; the ones after it resume.
        """

        async def run() -> None:
            connector = self.connector(trusting(self.root))
            for _ in range(3):
                await self.upgrade(connector)
            self.assertEqual(connector.handshakes, HandshakeCounts(full=1, resumed=2))

        return ensureDeferred(run())

    def test_newCertificateHandshakesInFull(self) -> Deferred[None]:
        """
        After a certificate change the session made with the old one is not
        offered.
        """

        async def run() -> None:
            connector = self.connector(trusting(self.root))
            await self.upgrade(connector)
            key_pem = generate_key()
            connector.use_certificate(
                self.root.sign_csr(make_csr(key_pem), days=1).cert_pem, key_pem
            )
            await self.upgrade(connector)
            await self.upgrade(connector)
            self.assertEqual(connector.handshakes, HandshakeCounts(full=2, resumed=1))

        return ensureDeferred(run())

    def test_newTrustVerifiesAgain(self) -> Deferred[None]:
        """
        A session made under one trust does not let a connection under another
        skip the check of the ingress's certificate.
        """

        async def run() -> None:
            connector = self.connector(trusting(self.root))
            await self.upgrade(connector)
            connector.use_trust(trusting(CertificateAuthority.create("other")))
            with self.assertRaises(TLSFailed):
                await self.upgrade(connector)
            self.assertEqual(connector.handshakes, HandshakeCounts(full=1, resumed=0))

        return ensureDeferred(run())

    def test_otherIngressHandshakesInFull(self) -> Deferred[None]:
        """
        A session with one ingress is not offered to another: a connector for
        another name of the same server starts with a full handshake.
        """

        async def run() -> None:
            await self.upgrade(self.connector(trusting(self.root)))
            elsewhere = self.connector(trusting(self.root), "localhost")
            await self.upgrade(elsewhere)
            await self.upgrade(elsewhere)
            self.assertEqual(elsewhere.handshakes, HandshakeCounts(full=1, resumed=1))

        return ensureDeferred(run())

    def test_failedHandshakeDropsSession(self) -> Deferred[None]:
        """
        After a handshake fails (here: the ingress now serves a certificate
        from a CA the client does not trust), the session is dropped, and the
        next connection is checked in full.
        """

        async def run() -> None:
            connector = self.connector(trusting(self.root))
            await self.upgrade(connector)
            stranger = CertificateAuthority.create("stranger")
            self.server_cert, self.server_key = stranger.issue_server(["127.0.0.1"])
            trusted_port, self.port = self.port, self.serve()
            connector.port = self.port
            with self.assertRaises(TLSFailed):
                await self.upgrade(connector)
            connector.port = trusted_port
            await self.upgrade(connector)
            self.assertEqual(connector.handshakes, HandshakeCounts(full=2, resumed=0))

        return ensureDeferred(run())


class TrustScopeTests(TestCase):
    """
    With no CA bundle configured, the platform's store verifies both the
    API and the ingress; an intermediate in it anchors the ingress's chain
    only. Here the platform's store is the devcloud's intermediate alone
    (C{SSL_CERT_FILE}), and both the devcloud's API and its ingress serve
    a certificate from that intermediate.
    """

    timeout = 30

    def setUp(self) -> None:
        echo = listen(Factory.forProtocol(Echo), self)
        self.devcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [("tcp://echo.test:7000", ("127.0.0.1", echo))],
        )
        self.addCleanup(self.devcloud.stop)
        self.empty = os.path.abspath(self.mktemp())
        os.makedirs(self.empty)
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            self.addCleanup(self.restore, name, os.environ.get(name))
        os.environ["SSL_CERT_DIR"] = self.empty

    def restore(self, name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    async def operators(self) -> Any:
        policy = LateTrustPolicy()
        policy.use(load_api_trust(None))
        key = self.devcloud.api_key
        api = make_api(reactor, self.devcloud.api_url, lambda: key, policy, 10.0)
        try:
            return await api.operators()
        finally:
            await api.close()

    def test_intermediateAnchorsTheIngressOnly(self) -> Deferred[None]:
        """
        The API client refuses a chain that stops at the intermediate in
        the store (and accepts it once the store holds the root); the
        ingress connector accepts it.
        """

        async def run() -> None:
            os.environ["SSL_CERT_FILE"] = self.devcloud.ingress_ca_path
            with self.assertRaises(APIUnavailable) as caught:
                await self.operators()
            self.assertIn("certificate verify failed", str(caught.exception))
            key_pem, csr_pem = new_csr()
            operator = self.devcloud.cloud.register(
                "test", "{}", ["bindings"], "global", {}, ["true"], csr_pem
            )
            host, port = self.devcloud.ingress_address
            connector = IngressConnector(
                reactor, host, port, load_ingress_trust(None, self.empty), 5.0, 5.0
            )
            connector.use_certificate(operator.cert.cert_pem, key_pem)
            upgraded = await connector.connect(wire.ConnRequest("echo.test", 7000))
            response = upgraded.response
            assert response is not None
            self.assertEqual((response.error_code, response.proto), ("", "tcp"))
            upgraded.transport.abortConnection()
            os.environ["SSL_CERT_FILE"] = self.devcloud.api_ca_path
            self.assertIsInstance(await self.operators(), list)

        return ensureDeferred(run())
