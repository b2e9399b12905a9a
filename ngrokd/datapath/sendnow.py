# -*- test-case-name: ngrokd.test.test_sendnow,ngrokd.test.test_twisted_seams -*-
"""
Writing to a TCP transport straight to its socket while nothing waits.

Twisted's TCP transport never sends in C{write}: it queues the bytes, asks
the reactor to watch the socket for writability, and sends on the next turn
of the reactor, joining what it queued into one copy and then asking the
reactor to stop watching. On a spliced connection that is a copy, two
C{epoll_ctl} calls and an extra reactor turn for every chunk that moves,
and the chunk waits a turn (a whole read of the other side) before it goes.
L{send_now} sends at once, all pieces in one C{sendmsg} without joining
them, when the transport has nothing queued; only what the socket does not
take is queued, with Twisted's own C{writeSequence}, so its bound on what it
holds, its pausing of the producer, its endings and its handling of errors
are unchanged.

It reads a few of Twisted's private members, each named in
L{TCP_INTERNALS}; L{ngrokd.test.test_twisted_seams} checks them against the
installed Twisted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp

#: Every private member of Twisted's TCP transport that L{send_now} reads,
#: and what for.
TCP_INTERNALS = {
    "_tempDataLen": "read: bytes queued by write and not yet joined",
    "dataBuffer": "read: bytes joined and not yet sent (from offset on)",
    "offset": "read: how much of dataBuffer is sent",
    "_writeDisconnecting": "read: no sending once a half-close is asked for",
    "_writeDisconnected": "read: no sending once the write side is shut",
    "socket": "called: send and sendmsg",
}


def send_now(transport: Any, pieces: Sequence[bytes | memoryview]) -> None:
    """
    Write C{pieces} to C{transport}, in order: straight to the socket when
    it is a TCP transport with nothing queued, else (and for what the socket
    does not take) as C{transport.write} and C{writeSequence} do. What is
    not sent at once is copied, so the caller may reuse a buffer it passed.
    """
    if not _idle(transport):
        _queue(transport, pieces)
        return
    try:
        if len(pieces) == 1:
            sent = transport.socket.send(pieces[0])
        else:
            sent = transport.socket.sendmsg(pieces)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Twisted meets the same error when it sends, and ends the
        # connection as it would have.
        _queue(transport, pieces)
        return
    rest = _unsent(pieces, sent)
    if rest:
        _queue(transport, rest)


def _queue(transport: Any, pieces: Sequence[bytes | memoryview]) -> None:
    """
    Write C{pieces} the transport's own way, as bytes (one piece with
    C{write}: a TLS transport's C{writeSequence} joins them first).
    """
    if len(pieces) == 1:
        transport.write(bytes(pieces[0]))
    else:
        transport.writeSequence([bytes(piece) for piece in pieces])


def _idle(transport: Any) -> bool:
    """
    Whether C{transport} is a connected TCP transport whose write side is
    open with nothing queued: then bytes sent now keep their order.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and bool(transport.connected)
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and unsent(transport) == 0
    )


def unsent(transport: Any) -> int:
    """
    Bytes a Twisted TCP transport holds unsent.

    C{FileDescriptor} keeps them in C{dataBuffer} (from C{offset} on) and in
    the private C{_tempDataLen}, the bytes of C{_tempDataBuffer} not yet
    joined into it; Twisted offers no public count.
    """
    return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)


def _unsent(
    pieces: Sequence[bytes | memoryview], sent: int
) -> list[bytes | memoryview]:
    """
    What is left of C{pieces} once the first C{sent} bytes are out.
    """
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            rest = [piece[sent:]] if sent else [piece]
            rest.extend(pieces[index + 1 :])
            return rest
        sent -= len(piece)
    return []
