# -*- test-case-name: ngrokd.test.test_splice -*-
"""
Joining two connections into one byte pipe.

Both the daemon's bridge (local client <-> ingress) and the devcloud's ingress
(ngrokd <-> backend) carry bytes both ways until both sides are done. Three
things make that correct:

 - flow control: each transport is the other's streaming producer, so a slow
   reader pauses the sender instead of growing a buffer without bound;
 - half-close: the end of one direction (a FIN, or a TLS C{close_notify} with
   L{ngrokd.datapath.halfclose}) is passed on as the end of that direction only, and the
   other keeps flowing; both connections close once both directions are done;
 - no lost bytes: what arrives before the join is held, with reading paused,
   and handed over at the join.

Endings are passed on honestly. When one side ends cleanly (its input ended
with a FIN or C{close_notify} and the connection closed without error) the
other is closed gracefully; if what is written to it cannot drain within
L{DRAIN_TIMEOUT} (its reader stopped reading), it is aborted. When one side
ends abnormally (a reset, an error, TLS ending without C{close_notify}), the
stream is truncated, so the other side is aborted at once: its peer sees a
reset, not a clean end, and no connection is left holding buffers that
nobody will read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ngrokd.datapath.sendnow import send_now

#: Seconds a connection closed gracefully has to send what it still holds.
DRAIN_TIMEOUT = 30.0
#: Bytes a spliced connection reads from its socket at once. Bigger reads
#: cost less Python per byte (fewer reactor turns, fewer calls down the
#: protocols); a read is one piece on its way to the peer, so the bound on
#: what a slow reader makes a connection hold is L{HOLD_SIZE} plus one read.
READ_SIZE = 256 * 1024
#: Bytes a spliced connection holds unsent for a slow reader before it
#: pauses the other side: Twisted's C{bufferSize}
#: (L{ngrokd.test.test_twisted_seams} checks what it means).
HOLD_SIZE = 128 * 1024


@implementer(IHalfCloseableProtocol)
class PipeProtocol(Protocol):
    """
    One end of a splice: what this connection receives is written to the peer.

    Subclasses may use the connection before the join (to run a handshake, say)
    and hand leftover bytes to L{hold}. C{transform}, when set, is applied to
    every chunk on its way to the peer; C{finish_transform} gives what it still
    holds when this side stops sending.
    """

    #: A TCP transport, or a TLS one from L{ngrokd.datapath.halfclose}: both can
    #: pause, half-close and take a producer.
    transport: Any

    transform: Callable[[bytes], bytes] | None = None
    finish_transform: Callable[[], bytes] | None = None

    #: Times the drain after a graceful close (set by L{splice}).
    clock: IReactorTime | None = None
    drain_timeout = DRAIN_TIMEOUT

    def __init__(self) -> None:
        self.peer: PipeProtocol | None = None
        self.bytes_received = 0
        self._held: list[bytes] = []
        self._read_done = False
        self._lost = False
        self._drain: IDelayedCall | None = None
        self.closed: Deferred[None] = Deferred()

    # Before the join

    def hold(self, data: bytes) -> None:
        """
        Keep C{data} for the peer and stop reading until the join.
        """
        if data:
            self._held.append(data)
            self.transport.pauseProducing()

    # Twisted callbacks

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self.hold(data)
            return
        self.bytes_received += len(data)
        if self.transform is not None:
            data = self.transform(data)
        if data:
            send_now(self.peer.transport, (data,))

    def viewReceived(self, view: memoryview) -> None:
        """
        Cleartext a TLS transport decrypted into a buffer it reuses
        (L{ngrokd.datapath.halfclose}). Once joined, with nothing to
        transform, it goes to the peer as it is (what is not sent at once
        is copied); else to L{dataReceived}, as bytes. Subclasses change
        L{dataReceived} only for what comes before the join.
        """
        peer = self.peer
        if peer is None or self.transform is not None:
            self.dataReceived(bytes(view))
            return
        self.bytes_received += len(view)
        send_now(peer.transport, (view,))

    def readConnectionLost(self) -> None:
        self._read_done = True
        if self.peer is not None:
            self._end_of_input()

    def writeConnectionLost(self) -> None:
        """
        Our FIN is out; nothing to do until the other direction ends.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        self._drain = None
        peer = self.peer
        if peer is not None and not peer._lost:
            if reason.check(ConnectionDone):
                peer.close()
            else:
                peer.abort()
        self.closed.callback(None)

    # Endings

    def close(self) -> None:
        """
        Close once what was written is sent; abort if that takes longer than
        C{drain_timeout}.
        """
        if self._lost:
            return
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # (Closing may have finished already, within loseConnection.)
        if self.clock is not None and self._drain is None and not self._lost:
            self._drain = self.clock.callLater(self.drain_timeout, self.abort)

    def abort(self) -> None:
        """
        Close at once, dropping what is unsent: the peer sees a reset.
        """
        if not self._lost:
            self.transport.abortConnection()

    # The splice

    def _start(self, peer: PipeProtocol) -> None:
        self.peer = peer
        held, self._held = self._held, []
        for data in held:
            self.dataReceived(data)
        if self._read_done:
            self._end_of_input()
        elif not self._lost:
            self.transport.resumeProducing()

    def _end_of_input(self) -> None:
        """
        This side will send no more: end the peer's output, and close both
        once the other direction has ended too.
        """
        assert self.peer is not None
        peer_transport = self.peer.transport
        if self.finish_transform is not None and not self.peer._lost:
            rest = self.finish_transform()
            if rest:
                peer_transport.write(rest)
        peer_transport.unregisterProducer()
        if self.peer._read_done:
            self.close()
            self.peer.close()
        else:
            peer_transport.loseWriteConnection()


def splice(a: PipeProtocol, b: PipeProtocol, clock: IReactorTime | None = None) -> None:
    """
    Join two connected pipes: from now on each one's input is the other's
    output, with flow control both ways. C{clock} times the drain of a
    graceful close (without it, a close waits for as long as it takes).
    """
    a.clock = b.clock = clock
    for end in (a, b):
        read_in_chunks(end.transport)
    if a._lost or b._lost:
        for end in (a, b):
            end.close()
        return
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)
    a._start(b)
    b._start(a)


def read_in_chunks(
    transport: Any, size: int = READ_SIZE, hold: int = HOLD_SIZE
) -> None:
    """
    Have a TCP transport, or the TCP under a TLS one, read C{size} bytes
    (at most L{READ_SIZE}) at a time and hold up to C{hold} unsent before it
    pauses its producer.

    Twisted's transport reads C{bufferSize} bytes at a time, the same
    number it holds: reads as big as a fast stream wants would double what
    a slow reader makes it hold. Its C{doRead} is replaced by one that
    reads C{size}: under TLS, into one buffer that TLS copies at once into
    OpenSSL, so no read allocates.
    """
    buffer = None
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport, buffer = transport.transport, _received
    if isinstance(transport, tcp.Connection):
        transport.bufferSize = hold
        # The reactor calls the transport's doRead, found on the instance
        # first: Twisted's class stays, one method of this one is ours.
        transport.doRead = partial(_read, transport, min(size, READ_SIZE), buffer)  # type: ignore[method-assign]


#: Where a TLS transport's ciphertext is read to, for every connection: the
#: reactor's thread alone uses it, and TLS copies it into OpenSSL before
#: anything else runs.
_received = memoryview(bytearray(READ_SIZE))


def _read(
    transport: tcp.Connection, size: int, buffer: memoryview | None
) -> ConnectionLost | ConnectionDone | None:
    """
    Twisted's C{doRead} for a TCP transport, reading up to C{size} bytes:
    into C{buffer} when given, whose view the protocol gets.
    """
    data: bytes | memoryview
    try:
        if buffer is None:
            data = transport.socket.recv(size)
        else:
            data = buffer[: transport.socket.recv_into(buffer, size)]
    except BlockingIOError:
        return None
    except OSError:
        return main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    protocol: Any = transport.protocol  # TLS's dataReceived takes views
    protocol.dataReceived(data)
    return None
