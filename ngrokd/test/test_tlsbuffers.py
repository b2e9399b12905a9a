"""
Tests for L{ngrokd.datapath.tlsbuffers}: a TLS connection's memory buffers
are swapped for empty ones only when nothing is in them, and the connection
carries data both ways after the swap, over a real OpenSSL handshake.
"""

from __future__ import annotations

import socket

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.tlsbuffers import release_buffers
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.ingress import server_options


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

    def test_notMemoryBIOs(self) -> None:
        """
        A connection over a socket has no memory buffers to release.
        """
        with socket.socket() as sock:
            context = SSL.Context(SSL.TLS_CLIENT_METHOD)
            self.assertFalse(release_buffers(SSL.Connection(context, sock)))
