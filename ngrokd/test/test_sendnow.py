"""
Tests for L{ngrokd.datapath.sendnow}.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.sendnow import send_now, unsent
from ngrokd.test.test_twisted_seams import Producer


class SendNowTests(SynchronousTestCase):
    """
    L{send_now} on Twisted's TCP transport over a real socket pair, the
    reactor a L{MemoryReactor} that shows what it was asked to watch.
    """

    def setUp(self) -> None:
        ours, self.theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(self.theirs.close)
        self.theirs.setblocking(False)
        self.reactor = MemoryReactor()
        self.protocol = Protocol()
        self.transport = tcp.Connection(ours, self.protocol, self.reactor)
        self.transport.connected = True  # as an accepted connection is
        self.protocol.makeConnection(self.transport)

    def read_all(self) -> bytes:
        """
        Read what the socket pair holds, letting the transport send what it
        queued meanwhile, as the reactor would.
        """
        got: list[bytes] = []
        while True:
            try:
                piece = self.theirs.recv(1 << 20)
            except BlockingIOError:
                if not unsent(self.transport):
                    return b"".join(got)
                self.transport.doWrite()
            else:
                got.append(piece)

    def test_sentWithoutTheReactor(self) -> None:
        """
        With nothing queued, the pieces are on the socket when C{send_now}
        returns: no turn of the reactor, no watching for writability.
        """
        send_now(self.transport, [b"abc", b"de", b"f"])
        self.assertEqual(self.theirs.recv(100), b"abcdef")
        self.assertEqual(unsent(self.transport), 0)
        self.assertEqual(self.reactor.getWriters(), [])

    def test_restQueuedInOrder(self) -> None:
        """
        What the socket does not take is queued behind what it took, and a
        streaming producer is paused once the queue is over C{bufferSize},
        as with C{write}: the bound on what a slow reader makes it hold.
        """
        producer = Producer()
        self.transport.registerProducer(producer, True)
        pieces = [bytes([n]) * 300_000 for n in range(1, 5)]
        send_now(self.transport, pieces)
        self.assertGreater(unsent(self.transport), self.transport.bufferSize)
        self.assertTrue(producer.paused)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        self.assertEqual(self.read_all(), b"".join(pieces))
        self.assertFalse(producer.paused)

    def test_bufferReusable(self) -> None:
        """
        What the socket does not take of a buffer passed as a memoryview is
        copied: the caller may fill the buffer again at once.
        """
        buffer = bytearray(b"a" * 2_000_000)
        send_now(self.transport, [memoryview(buffer)])
        buffer[:] = b"b" * len(buffer)
        self.assertEqual(self.read_all(), b"a" * len(buffer))

    def test_behindWhatIsQueued(self) -> None:
        """
        Bytes queued before are sent first: C{send_now} does not jump them.
        """
        self.transport.write(b"first ")
        send_now(self.transport, [b"second"])
        self.assertEqual(self.read_all(), b"first second")

    def test_afterHalfClose(self) -> None:
        """
        Once the write side is closed, bytes are dropped, as C{write} drops
        them.
        """
        self.transport.loseWriteConnection()
        self.transport.doWrite()
        send_now(self.transport, [b"late"])
        self.assertEqual(self.theirs.recv(100), b"")

    def test_errorEndsTheConnection(self) -> None:
        """
        A send that fails (the peer is gone) ends the connection the way
        Twisted ends it, with the error for the protocol.
        """
        self.theirs.close()
        send_now(self.transport, [b"to nobody"])
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        # What the reactor does next: the error tells it to end the
        # connection.
        self.assertIsInstance(self.transport.doWrite(), ConnectionLost)

    def test_otherTransports(self) -> None:
        """
        Any other transport gets the pieces through C{write} and
        C{writeSequence}.
        """
        transport = StringTransport()
        send_now(transport, [b"one"])
        send_now(transport, [b"two", b"three"])
        self.assertEqual(transport.value(), b"onetwothree")
