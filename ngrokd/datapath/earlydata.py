# -*- test-case-name: ngrokd.test.test_bridge,ngrokd.test.test_ingress -*-
"""
The client's first bytes, sent before the ingress has answered.

A connection to the ingress sends its C{ConnRequest} and waits a round trip
for the C{ConnResponse}; the client's first bytes (an HTTP request, a
database's startup message) would then wait another round trip for their
answer. Sent right behind the request instead, they are at the ingress when
it has its upstream, and the client's first answer comes one round trip
after the request, not two. The ingress reads the request's frame and no
more: every byte after it is the stream's, whenever it arrives.

It is bounded: the bridge offers one read of the client and reads no more
until the answer. Once a byte has gone (L{EarlyData.sent}), a connection
that fails before its answer is not made again on a new one: the ingress
may have passed the bytes on.
"""

from __future__ import annotations

from collections.abc import Callable


class EarlyData:
    """
    What the client sent before its connection to the ingress was answered,
    and whether any of it has gone.
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._write: Callable[[bytes], None] | None = None
        #: Whether a byte went out behind a request.
        self.sent = False

    def offer(self, data: bytes) -> None:
        """
        The client's first bytes: sent at once behind a request already
        written, else right behind the next one.
        """
        if data:
            self._pending.append(data)
            self._send()

    def follow(self, write: Callable[[bytes], None]) -> None:
        """
        A request was just written with C{write}: what is offered goes the
        same way, until L{stop}.
        """
        self._write = write
        self._send()

    def stop(self) -> None:
        """
        The request was answered, or failed: nothing more goes early on its
        connection.
        """
        self._write = None

    def _send(self) -> None:
        if self._write is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        self.sent = True
        for data in pending:
            self._write(data)
