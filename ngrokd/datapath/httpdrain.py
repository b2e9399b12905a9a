# -*- test-case-name: ngrokd.test.test_httpdrain -*-
"""
End a keep-alive HTTP/1.x connection at a response boundary.

When the daemon stops, the connections it carries get a grace period, and
those still open after it are reset. A keep-alive HTTP client sending a
request every few hundred milliseconds never lets its connection end, so it
was reset, perhaps in the middle of a response. L{Exchanges} frames both
directions of such a connection (the requests with
L{ngrokd.datapath.httprewrite.HostRewriter}, the responses with
L{ResponseFramer}) so that, once the grace starts, the connection can end
where HTTP lets a server end it: the requests already begun are answered,
the last answer says C{Connection: close} (unless its head has gone out
already), nothing the client sends after them is passed on, and the caller
closes the connection once that answer is complete (at once if the
connection is idle between requests).

A connection that leaves HTTP/1.x (a switch to a WebSocket or a tunnel, a
response whose end is the connection's end, a stream it cannot frame, more
than L{MAX_OUTSTANDING} requests waiting for their answer) is no longer
tracked: like a TCP connection, it has the grace to end on its own.
"""

from __future__ import annotations

import re
from collections import deque

from ngrokd.datapath.httpframing import (
    Malformed,
    MessageFramer,
    State,
    apply_edits,
    content_length,
    headers,
    show,
    tokens,
    values,
)
from ngrokd.datapath.httprewrite import HostRewriter

#: Requests passed on whose response has not begun, beyond which a
#: connection is no longer tracked (their methods are what it holds).
MAX_OUTSTANDING = 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?:[ \t][^\x00\r\n]*)?")
_HTTP1 = b"HTTP/1."
_CLOSE = b"Connection: close"
_RESPONSE_HEADERS = frozenset([b"content-length", b"transfer-encoding", b"connection"])


class ResponseFramer(MessageFramer):
    """
    Frames the responses of one connection's server-to-client stream, given
    the methods of the requests they answer, in order.
    """

    kind = "response"

    def __init__(self, methods: deque[bytes]) -> None:
        """
        @param methods: the method of each request passed on whose response
            has not begun; each final response takes the first.
        """
        super().__init__()
        self._methods = methods
        self._interim = False
        self._close_after: int | None = None
        #: Final responses complete so far.
        self.completed = 0

    def close_after(self, count: int) -> None:
        """
        Make the C{count}th final response say C{Connection: close} (if its
        head is still to come), and stop after it: L{stopped} is then true.
        """
        self._close_after = count
        if self.completed >= count and self._state is State.HEAD and not self._buffer:
            self._state = State.STOPPED

    def _ended(self) -> State:
        if self._interim:
            self._interim = False
            return State.HEAD
        self.completed += 1
        if self._close_after is not None and self.completed >= self._close_after:
            return State.STOPPED
        return State.HEAD

    def _check_prefix(self, start: bytes | bytearray) -> None:
        n = min(len(start), len(_HTTP1))
        if start[:n] != _HTTP1[:n]:
            raise Malformed(f"response starts with {show(start)}, not HTTP/1.x")

    def _check_start_line(self, line: bytes | bytearray) -> None:
        _status(line)

    def _frame(self, head: bytes) -> tuple[bytes, State, int]:
        lines = head.split(b"\n")
        first = lines[0]
        status = _status(first.removesuffix(b"\r"))
        if status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: the final response follows.
            headers(head, lines, frozenset())  # (checks each line)
            self._interim = True
            return head, State.HEAD, 0
        method = self._methods.popleft() if self._methods else b"GET"
        close = (
            self._close_after is not None and self.completed + 1 >= self._close_after
        )
        return _frame_response(head, lines, status, method, close)


def _status(line: bytes | bytearray) -> int:
    """
    The status code of a status line (its line end removed).
    """
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise Malformed(f"status line {show(line)} is not HTTP/1.x")
    return int(match.group(2))


def _frame_response(
    head: bytes, lines: list[bytes], status: int, method: bytes, close: bool
) -> tuple[bytes, State, int]:
    """
    Frame a final response to a C{method} request (RFC 9112 section 6.3),
    its C{Connection} header made C{close} if C{close}.
    """
    found = headers(head, lines, _RESPONSE_HEADERS)
    if close and b"close" not in tokens(values(found, b"connection")):
        # Any keep-alive goes; the blank line ends the head.
        edits = [(line.start, line.stop, b"") for line in found.get(b"connection", [])]
        eol = b"\r\n" if lines[0].endswith(b"\r") else b"\n"
        blank = len(head) - len(lines[-2]) - 1
        head = apply_edits(head, [*edits, (blank, blank, _CLOSE + eol)])
    lengths = values(found, b"content-length")
    codings = values(found, b"transfer-encoding")
    if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
        return head, State.PASSTHROUGH, 0  # no longer HTTP
    if method == b"HEAD" or status in (204, 304):
        return head, State.HEAD, 0
    if codings:
        if lengths or tokens(codings)[-1] != b"chunked":
            # Ends where the connection does (or is ambiguous): untracked.
            return head, State.PASSTHROUGH, 0
        return head, State.CHUNK_SIZE, 0
    if lengths:
        length = content_length(lengths)
        return head, State.BODY if length else State.HEAD, length
    return head, State.PASSTHROUGH, 0  # ends where the connection does


class Exchanges:
    """
    The requests and responses of one HTTP/1.x connection, so that it can
    end at a response boundary.

    Pass the client's bytes through L{upstream} (and L{upstream_done} when
    it stops sending) and the server's through L{downstream}; call L{drain}
    when the grace starts, and close the connection once L{ended} is true,
    after writing what L{downstream} returned.
    """

    def __init__(self, host: str | None) -> None:
        """
        @param host: the C{Host} every request gets, or C{None} to leave
            requests as they are.
        @raise ngrokd.datapath.httprewrite.InvalidHost: C{host} is not one.
        """
        self._methods: deque[bytes] = deque()
        self._overflow = False
        self.requests = HostRewriter(host, self._requested)
        self.responses = ResponseFramer(self._methods)

    @property
    def tracking(self) -> bool:
        """
        Whether the connection is still HTTP/1.x framed both ways.
        """
        return not (
            self.requests.passthrough or self.responses.passthrough or self._overflow
        )

    @property
    def ended(self) -> bool:
        """
        Whether the drain is over: the last response it waited for is
        complete, and what follows it either way is dropped.
        """
        return self.responses.stopped and self.tracking

    def upstream(self, data: bytes) -> bytes:
        """
        The client's next bytes: what to pass on to the server.
        """
        return self.requests.feed(data)

    def upstream_done(self) -> bytes:
        """
        The client has stopped sending: what it still held for the server.
        """
        if self.requests.between_messages:
            return b""  # still framed: its requests are all counted
        return self.requests.finish()

    def downstream(self, data: bytes) -> bytes:
        """
        The server's next bytes: what to pass on to the client.
        """
        responses = self.responses
        if responses.passthrough:
            return data
        if not self.tracking:
            return responses.finish() + data
        return responses.feed(data)

    def drain(self) -> None:
        """
        The grace has started: let the requests begun so far be answered
        (or the first, on a connection that has not sent one yet), the last
        answer say C{Connection: close}, and no request after them pass.
        An untracked connection is left to the grace.
        """
        if not self.tracking:
            return
        last = max(self.requests.begun, 1)
        self.requests.stop_after(last)
        self.responses.close_after(last)

    def _requested(self, method: bytes) -> None:
        if self._overflow:
            return
        if len(self._methods) == MAX_OUTSTANDING:
            self._overflow = True
            self._methods.clear()
            return
        self._methods.append(method)
