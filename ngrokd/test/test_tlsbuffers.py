"""
Tests for L{ngrokd.datapath.tlsbuffers}: a TLS connection's memory buffers
are swapped for empty ones only when nothing is in them, and the connection
carries data both ways after the swap, over a real OpenSSL handshake; a
connection to the devcloud's ingress has its buffers swapped once upgraded.
"""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.datapath.bridge import BridgeFactory
from ngrokd.datapath.resumption import ResumingCreator
from ngrokd.datapath.tlsbuffers import release_buffers, release_buffers_soon
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.ingress import server_options
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.test.helpers import Echo, devcloud_ingress, exchange, listen


def _pump(source: SSL.Connection, sink: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return moved
        sink.bio_write(data)
        moved += len(data)


def _read(connection: SSL.Connection) -> bytes:
    try:
        return connection.recv(65536)
    except SSL.WantReadError:
        return b""


class ReleaseBuffersTests(SynchronousTestCase):
    """
    L{release_buffers} on a client connection over memory BIOs.
    """

    def setUp(self) -> None:
        ca = CertificateAuthority.create("test root")
        cert, key = ca.issue_server(["ingress.test"])
        server = SSL.Connection(server_options(cert, key).getContext(), None)
        server.set_accept_state()
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
            if not _pump(client, server) + _pump(server, client):
                break
        _read(client)  # the session tickets
        self.client, self.server = client, server

    def test_releasedThenCarries(self) -> None:
        """
        After the handshake both buffers are empty: they are swapped, and
        bytes still go both ways.
        """
        self.assertTrue(release_buffers(self.client))
        self.client.send(b"request")
        _pump(self.client, self.server)
        self.assertEqual(_read(self.server), b"request")
        self.server.send(b"answer")
        _pump(self.server, self.client)
        self.assertEqual(_read(self.client), b"answer")

    def test_keptWhileBytesWait(self) -> None:
        """
        Bytes waiting in the incoming buffer keep it: nothing is swapped, and
        they are read afterwards.
        """
        self.server.send(b"waiting")
        _pump(self.server, self.client)
        self.assertFalse(release_buffers(self.client))
        self.assertEqual(_read(self.client), b"waiting")

    def test_keptWhileBytesLeave(self) -> None:
        """
        Bytes not yet taken from the outgoing buffer keep it too.
        """
        self.client.send(b"leaving")
        self.assertFalse(release_buffers(self.client))
        _pump(self.client, self.server)
        self.assertEqual(_read(self.server), b"leaving")

    def test_soonOnceRead(self) -> None:
        """
        Bytes waiting when the release is asked for put it off to the
        reactor's next turn, by when they have been read.
        """
        self.server.send(b"waiting")
        _pump(self.server, self.client)
        into = self.client._into_ssl
        clock = Clock()
        release_buffers_soon(clock, self.client)
        self.assertIs(self.client._into_ssl, into)
        self.assertEqual(_read(self.client), b"waiting")
        clock.advance(0)
        self.assertIsNot(self.client._into_ssl, into)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_notMemoryBIOs(self) -> None:
        """
        A connection over a socket has no memory buffers to release.
        """
        with socket.socket() as sock:
            context = SSL.Context(SSL.TLS_CLIENT_METHOD)
            self.assertFalse(release_buffers(SSL.Connection(context, sock)))


class UpgradedOverTLSTests(TestCase):
    """
    Connections to the devcloud's ingress over real mutual TLS.
    """

    timeout = 60

    async def test_buffersReleasedOnceUpgraded(self) -> None:
        """
        Each connection to the ingress runs over new, empty buffers once the
        ingress has answered, and carries the client's bytes both ways.
        """
        made: list[tuple[SSL.Connection, Any, Any]] = []
        create = ResumingCreator.clientConnectionForTLS

        def remembered(creator: ResumingCreator, protocol: Any) -> SSL.Connection:
            connection = create(creator, protocol)
            made.append((connection, connection._into_ssl, connection._from_ssl))
            return connection

        self.patch(ResumingCreator, "clientConnectionForTLS", remembered)
        url = "tcp://echo.test:7"
        harness = devcloud_ingress(self)
        echo = listen(Factory.forProtocol(Echo), self)
        harness.cloud.add_endpoint(url, ("127.0.0.1", echo))
        bridge = BridgeFactory(parse_endpoint_url(url), harness.connector, None)
        port = listen(bridge, self)
        for n in range(3):
            client = await exchange(port, b"echo %d" % n)
            self.assertEqual(client.received, b"echo %d" % n)
        self.assertTrue(made)
        for connection, into, out in made:
            self.assertNotIn(connection._into_ssl, (into, None))
            self.assertNotIn(connection._from_ssl, (out, None))
