"""
Tests for L{ngrokd.datapath.splice}: two pipes joined in memory, each on a
transport that pauses its producer when its buffer fills, as TCP does; and
how a spliced TCP transport reads, on a real socket.
"""

from __future__ import annotations

import socket

from twisted.internet import main
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.splice import (
    HOLD_SIZE,
    READ_SIZE,
    PipeProtocol,
    splice,
)
from ngrokd.test.helpers import TCPLikeTransport
from ngrokd.test.test_twisted_seams import ChunkReaderCase, Producer


def connected() -> tuple[PipeProtocol, TCPLikeTransport]:
    """
    A pipe on its own transport, not spliced yet.
    """
    pipe = PipeProtocol()
    transport = TCPLikeTransport()
    pipe.makeConnection(transport)
    return pipe, transport


class SpliceTestCase(SynchronousTestCase):
    """
    Two connected pipes, C{a} and C{b}, spliced at setUp.
    """

    def setUp(self) -> None:
        self.a, self.a_transport = connected()
        self.b, self.b_transport = connected()
        splice(self.a, self.b)

    def ends(self) -> dict[str, tuple[PipeProtocol, TCPLikeTransport]]:
        return {
            "a": (self.a, self.a_transport),
            "b": (self.b, self.b_transport),
        }


class FlowControlTests(SpliceTestCase):
    """
    A full write buffer on one connection pauses reading on the other, in
    both directions.
    """

    def assertFlowControlled(self, sender: str, receiver: str) -> None:
        (pipe, sender_transport), (_, receiver_transport) = (
            self.ends()[sender],
            self.ends()[receiver],
        )
        chunk = b"x" * (receiver_transport.bufferSize + 1)
        pipe.dataReceived(chunk)
        self.assertEqual(
            (sender_transport.producerState, receiver_transport.producerState),
            ("paused", "producing"),
            f"{receiver}'s full buffer must pause reading on {sender} only",
        )
        self.assertEqual(receiver_transport.drain(), chunk)
        self.assertEqual(sender_transport.producerState, "producing")

    def test_slowReaderOfA(self) -> None:
        """
        When what C{b} sends fills C{a}'s buffer, C{b} stops reading until
        C{a}'s buffer drains.
        """
        self.assertFlowControlled("b", "a")

    def test_slowReaderOfB(self) -> None:
        """
        When what C{a} sends fills C{b}'s buffer, C{a} stops reading until
        C{b}'s buffer drains.
        """
        self.assertFlowControlled("a", "b")


class BeforeTheJoinTests(SynchronousTestCase):
    """
    What arrives before the splice is held, with reading paused, and handed
    over at the join.
    """

    def test_heldBytesHandedOver(self) -> None:
        """
        Bytes received before the join stop reading, reach the peer at the
        join, and reading resumes.
        """
        a, a_transport = connected()
        b, b_transport = connected()
        a.dataReceived(b"early")
        self.assertEqual(a_transport.producerState, "paused")
        splice(a, b)
        self.assertEqual(
            (b_transport.value(), a_transport.producerState),
            (b"early", "producing"),
        )

    def test_endBeforeTheJoin(self) -> None:
        """
        A side whose input ended before the join has its bytes and then its
        end passed on at the join; the other direction still flows.
        """
        a, a_transport = connected()
        b, b_transport = connected()
        a.dataReceived(b"request")
        a.readConnectionLost()
        splice(a, b)
        self.assertEqual(
            (b_transport.value(), b_transport.write_closed), (b"request", True)
        )
        b.dataReceived(b"reply")
        self.assertEqual(a_transport.value(), b"reply")
        self.assertFalse(a_transport.disconnecting)

    def test_sideLostBeforeTheJoin(self) -> None:
        """
        Splicing a pipe whose connection is already gone closes the other
        one, with no producer left registered on it.
        """
        a, a_transport = connected()
        b, b_transport = connected()
        a.connectionLost(Failure(ConnectionLost()))
        splice(a, b)
        self.assertTrue(b_transport.disconnecting)
        self.assertIsNone(b_transport.producer)
        self.assertIsNone(b.peer)


class HalfCloseTests(SpliceTestCase):
    """
    The end of one direction is passed on as the end of that direction only;
    both connections close once both directions have ended.
    """

    def assertHalfClose(self, first: str, second: str) -> None:
        (first_pipe, first_transport), (second_pipe, second_transport) = (
            self.ends()[first],
            self.ends()[second],
        )
        first_pipe.readConnectionLost()
        self.assertTrue(second_transport.write_closed, f"no FIN reached {second}")
        # Unregistered first: TLS sends no close_notify while a producer is.
        self.assertIsNone(second_transport.producer)
        self.assertFalse(
            first_transport.disconnecting or second_transport.disconnecting
        )
        second_pipe.dataReceived(b"answer")
        self.assertEqual(first_transport.value(), b"answer")
        self.assertIs(first_transport.producer, second_transport)
        second_pipe.readConnectionLost()
        self.assertTrue(
            first_transport.disconnecting and second_transport.disconnecting
        )

    def test_finFromA(self) -> None:
        """
        When C{a} stops sending, C{b} gets a FIN, C{b}'s answer still reaches
        C{a}, and both close when C{b} stops sending too.
        """
        self.assertHalfClose("a", "b")

    def test_finFromB(self) -> None:
        """
        When C{b} stops sending, C{a} gets a FIN, C{a}'s answer still reaches
        C{b}, and both close when C{a} stops sending too.
        """
        self.assertHalfClose("b", "a")

    def test_transformFinishedBeforeFin(self) -> None:
        """
        Every chunk goes through C{transform} on its way; what the transform
        still holds when its side stops sending goes out before the FIN.
        """
        self.a.transform = bytes.upper
        self.a.finish_transform = lambda: b"!"
        self.a.dataReceived(b"hello")
        self.assertEqual(self.b_transport.value(), b"HELLO")
        self.a.readConnectionLost()
        self.assertEqual(self.b_transport.value(), b"HELLO!")
        self.assertTrue(self.b_transport.write_closed)


class AbortTests(SpliceTestCase):
    """
    When either connection is lost with an error, its stream was cut short:
    the other is reset at once. When it ends cleanly, the other is closed
    gracefully.
    """

    def assertOtherReset(self, lost: str, other: str) -> None:
        (lost_pipe, _), (other_pipe, other_transport) = (
            self.ends()[lost],
            self.ends()[other],
        )
        lost_pipe.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(other_transport.disconnected, f"{other} was not reset")
        self.successResultOf(lost_pipe.closed)
        self.assertNoResult(other_pipe.closed)

    def test_aLost(self) -> None:
        """
        Losing C{a}'s connection resets C{b}'s.
        """
        self.assertOtherReset("a", "b")

    def test_bLost(self) -> None:
        """
        Losing C{b}'s connection resets C{a}'s.
        """
        self.assertOtherReset("b", "a")

    def test_lostAfterHalfClose(self) -> None:
        """
        A connection lost while the other direction is still open (C{a} has
        sent all it will, C{b} dies before answering) resets C{a} too.
        """
        self.a.readConnectionLost()
        self.assertOtherReset("b", "a")

    def test_cleanEndClosesOther(self) -> None:
        """
        A connection that ends cleanly closes the other gracefully, its
        producer unregistered first (TLS sends no close_notify otherwise).
        """
        self.b.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.a_transport.disconnecting)
        self.assertFalse(self.a_transport.disconnected)
        self.assertIsNone(self.a_transport.producer)


class ReadInChunksTests(ChunkReaderCase):
    """
    A TCP transport made to read in chunks as a splice makes it.
    """

    def test_readsMoreThanItHolds(self) -> None:
        """
        One read takes more than the transport holds for a slow reader
        before it pauses its producer: bigger reads do not loosen that
        bound.
        """
        size = 200 * 1024  # what a socket pair's buffer takes
        self.assertTrue(HOLD_SIZE < size <= READ_SIZE)
        self.theirs.sendall(b"x" * size)
        self.assertIsNone(self.transport.doRead())
        producer = Producer()
        self.transport.registerProducer(producer, True)
        self.transport.write(b"x" * HOLD_SIZE)
        paused = [producer.paused]
        self.transport.write(b"x")
        paused.append(producer.paused)
        self.assertEqual((self.received.sizes, paused), ([size], [False, True]))

    def test_nothingToRead(self) -> None:
        """
        A read that finds nothing waits for the next.
        """
        self.assertIsNone(self.transport.doRead())
        self.assertEqual(self.received.sizes, [])

    def test_endOfStream(self) -> None:
        """
        The peer's FIN ends the input cleanly.
        """
        self.theirs.shutdown(socket.SHUT_WR)
        self.assertIs(self.transport.doRead(), main.CONNECTION_DONE)

    def test_reset(self) -> None:
        """
        A reset is a lost connection, not a clean end.
        """
        self.ours.send(b"unread")
        self.theirs.close()
        self.assertIs(self.transport.doRead(), main.CONNECTION_LOST)
