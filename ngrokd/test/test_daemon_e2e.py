"""
The daemon end to end: the real L{Daemon} registers with the devcloud's API
over HTTPS, discovers its endpoints, listens on loopback, and carries
connections over mutual TLS through the devcloud's ingress to real backends.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ngrokd.config import load_config
from ngrokd.daemon import Daemon
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.ingress import (
    IngressFactory,
    IngressFault,
    server_options,
    tls_factory,
)
from ngrokd.devcloud.tap import RunningDevcloud, load_authorities, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.ngrok.identity import generate_key, make_csr
from ngrokd.test.helpers import (
    Counter,
    Echo,
    Recorder,
    Source,
    assert_flow_controlled,
    connect,
    exchange,
    free_ports,
    listen,
    unused_port,
    wait_listening,
)

ECHO = "tcp://echo.test:7000"


class HostEcho(Resource):
    """
    Answers every request with the Host it arrived with and its body size.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        host = request.getHeader("host")
        return f"host={host} body={len(body)}\n".encode()


class DaemonEndToEndTests(TestCase):
    """
    ngrokd against the devcloud, everything real on 127.0.0.1.
    """

    timeout = 60

    def setUp(self) -> None:
        self.echo_port = listen(Factory.forProtocol(Echo), self)
        self.web_port = listen(Site(HostEcho()), self)
        self.state = os.path.abspath(self.mktemp())
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            self.state,
            [
                ("tcp://echo.test:7000", ("127.0.0.1", self.echo_port)),
                ("http://web.test", ("127.0.0.1", self.web_port)),
            ],
            start_port=free_ports(16),
        )
        self.addCleanup(self.devcloud.stop)

    async def start_daemon(self, expected: int = 2, **ingress: Any) -> Daemon:
        """
        Start a daemon with the devcloud's config (ingress settings changed
        by C{ingress}) and wait until C{expected} endpoints listen.
        """
        config = load_config(self.devcloud.config_path).config
        if ingress:
            config = attrs.evolve(
                config, ingress=attrs.evolve(config.ingress, **ingress)
            )
        daemon = Daemon(config, reactor)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        await wait_listening(daemon, expected)
        return daemon

    def port_of(self, daemon: Daemon, url: str) -> int:
        return daemon.listeners.listeners[parse_endpoint_url(url).url].spec.port

    def stats_of(self, daemon: Daemon, url: str) -> Any:
        return daemon.listeners.listeners[parse_endpoint_url(url).url].stats

    def test_registration(self) -> Deferred[None]:
        """
        Without a certificate the daemon registers: the key is written 0600,
        the certificate and operator id are stored, and a restart reuses them
        instead of registering again.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            state_dir = daemon.config.server.state_dir
            mode = stat.S_IMODE(os.stat(os.path.join(state_dir, "tls.key")).st_mode)
            self.assertEqual(mode, 0o600)
            with open(os.path.join(state_dir, "operator_id")) as f:
                operator_id = f.read()
            self.assertEqual(
                [o.id for o in self.devcloud.cloud.operators()], [operator_id]
            )
            await daemon.stopService()
            again = await self.start_daemon()
            assert again.identity is not None
            self.assertEqual(again.identity.operator_id, operator_id)
            self.assertEqual(len(self.devcloud.cloud.operators()), 1)

        return ensureDeferred(run())

    def test_pagination(self) -> Deferred[None]:
        """
        Endpoints on every page of the API's answer are served.
        """

        async def run() -> None:
            self.devcloud.cloud.page_size = 2
            for n in range(5):
                self.devcloud.cloud.add_endpoint(
                    f"tcp://more{n}.test:{6000 + n}", ("127.0.0.1", self.echo_port)
                )
            daemon = await self.start_daemon(expected=7)
            client = await exchange(self.port_of(daemon, "tcp://more4.test:6004"), b"p")
            self.assertEqual(client.received, b"p")

        return ensureDeferred(run())

    def test_tcpHalfCloseFromClient(self) -> Deferred[None]:
        """
        A client that stops sending still gets everything the backend sends
        after that: the end of its input reaches the backend as an EOF.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            data = os.urandom(300_000)
            client = await exchange(self.port_of(daemon, "tcp://echo.test:7000"), data)
            self.assertEqual(client.received, data)
            stats = self.stats_of(daemon, "tcp://echo.test:7000")
            self.assertEqual((stats.bytes_up, stats.bytes_down), (len(data), len(data)))

        return ensureDeferred(run())

    def test_tcpHalfCloseFromBackend(self) -> Deferred[None]:
        """
        A backend that stops sending first still receives what the client
        sends after seeing the end of the stream.
        """

        async def run() -> None:
            backend = Recorder(on_connected=_greet_and_half_close)
            port = listen(Factory.forProtocol(lambda: backend), self)
            self.devcloud.cloud.add_endpoint(
                "tcp://greeter.test:25", ("127.0.0.1", port)
            )
            daemon = await self.start_daemon(expected=3)
            client = Recorder(on_read_closed=_answer_and_close)
            await connect(self.port_of(daemon, "tcp://greeter.test:25"), client)
            await backend.lost
            self.assertEqual(client.received, b"hello")
            self.assertTrue(client.read_closed)
            self.assertEqual(backend.received, b"got hello")

        return ensureDeferred(run())

    def test_httpHostRewrittenOnEveryRequest(self) -> Deferred[None]:
        """
        In network mode each request of a keep-alive connection, chunked
        bodies included, reaches the backend with the endpoint's Host.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            port = self.port_of(daemon, "http://web.test")
            requests = (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                f"POST /up HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                f"GET /last HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            client = Recorder()
            await connect(port, client)
            client.transport.write(requests)
            await client.lost
            answers = re.findall(rb"host=\S+ body=\d+", client.received)
            self.assertEqual(
                answers,
                [
                    b"host=web.test body=0",
                    b"host=web.test body=11",
                    b"host=web.test body=0",
                ],
            )

        return ensureDeferred(run())

    def test_refusedUpgrade(self) -> Deferred[None]:
        """
        When the ingress refuses (the endpoint is gone), a TCP client is
        disconnected, an HTTP client gets a 502 saying why, and the endpoint
        counts the error with ngrok's code until a connection works again.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            self.devcloud.cloud.remove_endpoint("tcp://echo.test:7000")
            self.devcloud.cloud.remove_endpoint("http://web.test")
            client = await exchange(self.port_of(daemon, "tcp://echo.test:7000"), b"x")
            self.assertEqual(client.received, b"")
            stats = self.stats_of(daemon, "tcp://echo.test:7000")
            self.assertEqual(stats.errors, 1)
            self.assertIn("ERR_NGROK_3200", stats.last_error)
            web = await exchange(
                self.port_of(daemon, "http://web.test"), b"GET / HTTP/1.1\r\n\r\n"
            )
            self.assertTrue(web.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
            self.assertIn(b"ERR_NGROK_3200", web.received)
            self.devcloud.cloud.add_endpoint(
                "tcp://echo.test:7000", ("127.0.0.1", self.echo_port)
            )
            again = await exchange(
                self.port_of(daemon, "tcp://echo.test:7000"), b"back"
            )
            self.assertEqual((again.received, stats.last_error), (b"back", ""))

        return ensureDeferred(run())

    def test_backendDown(self) -> Deferred[None]:
        """
        A backend that is down is reported with the ingress's reason.
        """

        async def run() -> None:
            self.devcloud.cloud.add_endpoint(
                "tcp://down.test:1", ("127.0.0.1", unused_port())
            )
            daemon = await self.start_daemon(expected=3)
            client = await exchange(self.port_of(daemon, "tcp://down.test:1"), b"x")
            self.assertEqual(client.received, b"")
            self.assertIn(
                "ERR_NGROK_8012", self.stats_of(daemon, "tcp://down.test:1").last_error
            )

        return ensureDeferred(run())

    def test_wrongClientCertificate(self) -> Deferred[None]:
        """
        A client certificate the ingress does not accept fails the connection
        with a TLS error, and the daemon keeps serving.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            stranger = CertificateAuthority.create("someone else")
            key_pem = generate_key()
            cert = stranger.sign_csr(make_csr(key_pem), days=1)
            daemon.connector.use_certificate(cert.cert_pem, key_pem)
            client = await exchange(self.port_of(daemon, "tcp://echo.test:7000"), b"x")
            self.assertEqual(client.received, b"")
            error = self.stats_of(daemon, "tcp://echo.test:7000").last_error
            self.assertIn("TLS", error)
            self.assertTrue(
                daemon.listeners.listeners[
                    parse_endpoint_url("tcp://echo.test:7000").url
                ].listening
            )

        return ensureDeferred(run())

    def test_ingressNeverAnswers(self) -> Deferred[None]:
        """
        An ingress that never answers the upgrade is given up on after
        C{ingress.upgrade_timeout}.
        """

        async def run() -> None:
            daemon = await self.start_daemon(upgrade_timeout=0.5)
            self.devcloud.ingress.inject(
                "tcp://echo.test:7000", IngressFault(stall=True)
            )
            client = await exchange(self.port_of(daemon, "tcp://echo.test:7000"), b"x")
            self.assertEqual(client.received, b"")
            self.assertIn(
                "no upgrade response",
                self.stats_of(daemon, "tcp://echo.test:7000").last_error,
            )

        return ensureDeferred(run())

    def test_impostorIngressGetsNothing(self) -> Deferred[None]:
        """
        A daemon built from a normal config (no C{insecure_skip_verify})
        checks the ingress it dials: one whose certificate does not chain to
        the configured CA, or chains to it but names another host, never
        gets the request or a byte of the client's, though it would accept
        the daemon's certificate and carry the connection. The client is
        disconnected and the endpoint says why.
        """

        async def run() -> None:
            root, intermediate = load_authorities(self.devcloud.state_dir)
            stranger = CertificateAuthority.create("ngrokd devcloud Root CA")
            for issuer, name, reason in [
                (stranger, "127.0.0.1", "certificate verify failed"),
                (intermediate, "elsewhere.test", "not for 127.0.0.1"),
            ]:
                impostor = IngressFactory(self.devcloud.cloud, reactor)
                self.addCleanup(impostor.close_all)
                cert_pem, key_pem = issuer.issue_server([name])
                options = server_options(cert_pem, key_pem, root.cert_pem)
                port = listen(tls_factory(impostor, options), self)
                daemon = await self.start_daemon(endpoint=f"127.0.0.1:{port}")
                self.assertFalse(daemon.config.ingress.insecure_skip_verify)
                client = await exchange(self.port_of(daemon, ECHO), b"secret")
                self.assertEqual(client.received, b"")
                self.assertEqual(impostor.requests_total, 0)
                self.assertIn(reason, self.stats_of(daemon, ECHO).last_error)
                await daemon.stopService()

        return ensureDeferred(run())

    def test_ingressNeverHandshakes(self) -> Deferred[None]:
        """
        An ingress that accepts TCP and never answers the TLS handshake is
        given up on after C{ingress.connect_timeout}: the client is
        disconnected and the endpoint says why.
        """

        async def run() -> None:
            silent = listen(Factory.forProtocol(Protocol), self)
            daemon = await self.start_daemon(
                endpoint=f"127.0.0.1:{silent}", connect_timeout=0.5
            )
            exchanged = ensureDeferred(exchange(self.port_of(daemon, ECHO), b"x"))
            client = await exchanged.addTimeout(20, reactor)
            self.assertEqual(client.received, b"")
            self.assertIn("no TLS handshake", self.stats_of(daemon, ECHO).last_error)

        return ensureDeferred(run())

    def test_slowReader(self) -> Deferred[None]:
        """
        A client that does not read makes the backend wait instead of making
        the daemon buffer: the daemon holds under 512 KiB for it, and every
        byte arrives, unchanged and in order (through both processes' TLS
        and splices), once the client reads again.
        """

        async def run() -> None:
            source = PatternSource(64 * 1024 * 1024)
            port = listen(Factory.forProtocol(lambda: source), self)
            self.devcloud.cloud.add_endpoint("tcp://bulk.test:9", ("127.0.0.1", port))
            daemon = await self.start_daemon(expected=3)
            client = Digest()
            await connect(self.port_of(daemon, "tcp://bulk.test:9"), client)
            client.transport.pauseProducing()
            factory = daemon.listeners.listeners[
                parse_endpoint_url("tcp://bulk.test:9").url
            ].factory
            await assert_flow_controlled(self, source, factory, client)
            self.assertEqual(
                client.digest.hexdigest(), hashlib.sha256(source.data).hexdigest()
            )

        return ensureDeferred(run())


class PatternSource(Source):
    """
    A L{Source} of bytes that differ from one place in the stream to the
    next, so that a piece lost, repeated or overwritten shows.
    """

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.data = random.Random(24).randbytes(total)

    def piece(self) -> bytes:
        return self.data[self.sent : self.sent + len(self.chunk)]


class Digest(Counter):
    """
    Counts what arrives, and hashes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.digest = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.digest.update(data)


def _greet_and_half_close(server: Recorder) -> None:
    server.transport.write(b"hello")
    server.transport.loseWriteConnection()


def _answer_and_close(client: Recorder) -> None:
    client.transport.write(b"got " + client.received)
    client.transport.loseConnection()
