"""
Tests for L{ngrokd.datapath.halfclose}, over real TLS on loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL.SSL import Error as SSLError
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ngrokd.datapath.halfclose import (
    DELIVER_SIZE,
    HalfCloseableTLSClientEndpoint,
    HalfCloseableTLSFactory,
)
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.ngrok.trust import PartialChainTrust, client_creator
from ngrokd.pem import parse_certificates
from ngrokd.test.helpers import Recorder, listen, wait_until


def _greet(server: Recorder) -> None:
    server.transport.write(b"hi")


class NotHalfCloseable(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


#: Cleartext in one TLS record, at most.
RECORD = 16 * 1024


class Pieces(Recorder):
    """
    Records the size of each piece as well.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.sizes.append(len(data))
        super().dataReceived(data)


class HalfCloseTests(TestCase):
    """
    A FIN-like shutdown of one direction over TLS leaves the other flowing.
    """

    timeout = 10

    def setUp(self) -> None:
        ca = CertificateAuthority.create("test root")
        cert, key = ca.issue_server(["localhost"])
        self.serverOptions = ssl.PrivateCertificate.loadPEM(cert + key).options()
        self.clientCreator = client_creator(
            "localhost", PartialChainTrust(parse_certificates(ca.cert_pem, "ca"), False)
        )
        self.serverProtocols: list[Any] = []

    def listen(self, makeProtocol) -> int:
        def build() -> Protocol:
            protocol = makeProtocol()
            self.serverProtocols.append(protocol)
            return protocol

        factory = HalfCloseableTLSFactory(
            self.serverOptions, False, Factory.forProtocol(build)
        )
        return listen(factory, self)

    def connect(self, port: int, protocol: Protocol) -> Deferred:
        endpoint = HalfCloseableTLSClientEndpoint(
            self.clientCreator, TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    @inlineCallbacks
    def test_clientHalfClose(self):
        """
        A client that stops sending still gets the server's whole reply, and
        the server sees the end of the request as C{readConnectionLost}.
        """

        def reply(server: Recorder) -> None:
            server.transport.write(b"pong:" + server.received)
            server.transport.loseConnection()

        port = self.listen(lambda: Recorder(on_read_closed=reply))
        client = Recorder()
        yield self.connect(port, client)
        client.transport.write(b"ping")
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(client.received, b"pong:ping")
        assert client.reason is not None
        client.reason.trap(ConnectionDone)
        server = self.serverProtocols[0]
        yield server.lost
        self.assertTrue(server.read_closed)

    @inlineCallbacks
    def serverFirst(self, greeting: bytes, answer: Callable[[bytes], bytes]):
        """
        The server sends C{greeting} and stops sending; the client, once it
        has read all of it, sends C{answer(what it read)} and closes. Fires
        with the client and the server, both closed.
        """

        def greet(server: Recorder) -> None:
            server.transport.write(greeting)
            server.transport.loseWriteConnection()

        port = self.listen(lambda: Pieces(on_connected=greet))

        def reply(client: Recorder) -> None:
            client.transport.write(answer(client.received))
            client.transport.loseConnection()

        client = Pieces(on_read_closed=reply)
        yield self.connect(port, client)
        yield client.lost
        server = self.serverProtocols[0]
        yield server.lost
        return client, server

    @inlineCallbacks
    def test_serverHalfClose(self):
        """
        A server that stops sending still gets what the client sends after,
        and the client sees the close as C{readConnectionLost}.
        """
        client, server = yield self.serverFirst(b"hello", lambda got: b"got " + got)
        self.assertEqual((client.received, client.read_closed), (b"hello", True))
        self.assertEqual(server.received, b"got hello")

    @inlineCallbacks
    def test_writesAfterHalfCloseDropped(self):
        """
        Writing after C{loseWriteConnection} neither raises nor breaks the
        connection.
        """

        def reply(server: Recorder) -> None:
            server.transport.write(b"still here")
            server.transport.loseConnection()

        port = self.listen(lambda: Recorder(on_read_closed=reply))
        client = Recorder()
        yield self.connect(port, client)
        client.transport.write(b"a")
        client.transport.loseWriteConnection()
        client.transport.write(b"b")
        yield client.lost
        assert client.reason is not None
        client.reason.trap(ConnectionDone)
        self.assertEqual(client.received, b"still here")
        self.assertEqual(self.serverProtocols[0].received, b"a")

    @inlineCallbacks
    def test_bigWrites(self):
        """
        Writes of megabytes, made before the handshake is done and after,
        arrive whole and in order; the records a read brings are handed on
        together, in pieces of at most L{DELIVER_SIZE}.
        """
        pattern = bytes(range(251)) * 12_000  # ~3 MB, no run repeats a record
        client, server = yield self.serverFirst(pattern, lambda got: got[::-1])
        self.assertEqual(client.received, pattern)
        self.assertEqual(server.received, pattern[::-1])
        for side in (client, server):
            self.assertGreater(max(side.sizes), RECORD)
            self.assertLessEqual(max(side.sizes), DELIVER_SIZE)

    @inlineCallbacks
    def test_corruptRecordEndsWithError(self):
        """
        A record that does not decrypt ends the connection with OpenSSL's
        error, not as a clean end; what came before it is handed on first.
        """
        port = self.listen(lambda: Recorder(on_connected=_greet))
        client = Recorder()
        yield self.connect(port, client)
        client.transport.write(b"first")
        # The greeting comes once the handshake is done.
        yield ensureDeferred(wait_until(lambda: client.received != b"", "greeting"))
        # An application-data record whose tag cannot match.
        client.transport.transport.write(b"\x17\x03\x03\x00\x20" + bytes(32))
        yield client.lost
        server = self.serverProtocols[0]
        yield server.lost
        self.assertEqual(server.received, b"first")
        server.reason.trap(SSLError)

    @inlineCallbacks
    def test_notHalfCloseable(self):
        """
        A protocol that cannot half-close is disconnected by the peer's
        C{close_notify}, as with Twisted's own TLS.
        """

        def greet(server: Recorder) -> None:
            server.transport.write(b"bye")
            server.transport.loseWriteConnection()

        port = self.listen(lambda: Recorder(on_connected=greet))
        client = NotHalfCloseable()
        yield self.connect(port, client)
        yield client.lost
        yield self.serverProtocols[0].lost
        self.assertEqual(client.received, b"bye")
