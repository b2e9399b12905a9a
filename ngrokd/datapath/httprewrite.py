# -*- test-case-name: ngrokd.test.test_httprewrite -*-
"""
Give every HTTP/1.x request on a local connection the bound endpoint's C{Host}.

In network mode a local client reaches an endpoint through an address such as
C{localhost:9080}, so its requests say C{Host: localhost:9080}; ngrok routes
HTTP endpoints by C{Host}, so every request must name the endpoint instead. The
Go original rewrote only the first request, re-serialised it (adding a
User-Agent), sent nothing back until that request's whole body was sent, and
dropped the bytes it had buffered when parsing failed (seed-spec faults 5, 6).

L{HostRewriter} is a sans-IO filter over the client-to-server byte stream,
framed by L{ngrokd.datapath.httpframing}: it holds back only request heads
and single lines of chunked framing; body bytes are sliced through as they
arrive, so C{Expect: 100-continue} and full-duplex exchanges never stall (a
client that gets a final answer instead of 100 still sends the body or
closes, RFC 9110 section 10.1.1, so the framing holds). In each head the
first Host value becomes the endpoint's, later Host lines go, a missing one
is added, and an absolute-form target's authority becomes the endpoint's;
every other byte passes exactly as the client sent it. Given no host (in
virtual mode, where clients already use the endpoint's name) it only frames,
so that a connection can end between requests
(L{ngrokd.datapath.httpdrain}).

It sees only the request side. After a request that may switch protocols
(C{CONNECT}, or C{Upgrade} with C{Connection: upgrade}) it cannot tell whether
the server agreed (the 101 or 2xx goes the other way), and the bytes after a
switch are not HTTP, so it stops parsing and passes everything through:
rewriting inside a WebSocket or tunnel would corrupt it, whereas a request
that follows a refused upgrade only keeps the client's own Host. A request it
cannot frame with certainty is passed through the same way, and the reason
is in L{HostRewriter.gave_up}.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ngrokd.datapath.httpframing import (
    TOKEN_CHARS,
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

_TCHAR = frozenset(
    b"!#$%&'*+-.^_`|~0123456789" + bytes(range(65, 91)) + bytes(range(97, 123))
)
_REQUEST_LINE = re.compile(
    b"([" + TOKEN_CHARS + rb"]+) ([^\x00-\x20\x7f]+) HTTP/1\.([0-9])"
)
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#@]*@)?([^/?#]*)")
_OWS = b" \t"
_REQUEST_HEADERS = frozenset(
    [b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"]
)


class InvalidHost(ValueError):
    """
    The Host value to write is not one an HTTP header or URL authority can
    carry.
    """


class HostRewriter(MessageFramer):
    """
    Rewrites the Host of each request in one connection's client-to-server
    stream (keep-alive and pipelined requests alike), and counts them.
    """

    kind = "request"

    def __init__(
        self, host: str | None, on_request: Callable[[bytes], None] | None = None
    ) -> None:
        """
        @param host: the exact C{Host} value every request gets, such as
            C{web.prod} or C{web.prod:8080} for a URL with a non-default port,
            or C{None} to leave every head as it is.
        @param on_request: called with each request's method as its head is
            passed on.
        @raise InvalidHost: C{host} is empty, not ASCII, or has whitespace,
            controls or URL delimiters in it.
        """
        super().__init__()
        self._host = None if host is None else _encode_host(host)
        self._on_request = on_request
        self._limit: int | None = None
        #: Requests begun so far (their first byte came).
        self.begun = 0

    def stop_after(self, count: int) -> None:
        """
        Pass on no request after the C{count}th: from the next one's first
        byte on, drop what the client sends.
        """
        self._limit = count

    def _begin(self) -> bool:
        if self._limit is not None and self.begun >= self._limit:
            return False
        self.begun += 1
        return True

    def _check_prefix(self, start: bytes | bytearray) -> None:
        if start[0] not in _TCHAR:
            raise Malformed(f"request starts with {show(start)}, not a method")

    def _check_start_line(self, line: bytes | bytearray) -> None:
        _request_line(line)

    def _frame(self, head: bytes) -> tuple[bytes, State, int]:
        method, rewritten, state, length = _rewrite_head(head, self._host)
        if self._on_request is not None:
            self._on_request(method)
        return rewritten, state, length


def _encode_host(host: str) -> bytes:
    try:
        encoded = host.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidHost(f"Host {host!r} is not ASCII (use its IDNA form)") from None
    if not encoded or re.search(rb"[^\x21-\x7e]|[/?#@]", encoded):
        raise InvalidHost(f"{host!r} is not a valid Host value")
    return encoded


def _request_line(line: bytes | bytearray) -> tuple[bytes, bytes, bytes]:
    """
    Method, target and minor version of a request line (its line end
    removed).
    """
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise Malformed(f"request line {show(line)} is not HTTP/1.x")
    method, target, minor = match.groups()
    return bytes(method), bytes(target), bytes(minor)


def _rewrite_head(head: bytes, host: bytes | None) -> tuple[bytes, bytes, State, int]:
    """
    Rewrite a complete request head and say how its body is framed.

    The first Host header gets C{host} as its value (name, spacing and line end
    kept), later ones are removed, and one is inserted after the request line
    when there is none. An absolute-form target's authority (RFC 9112 section
    3.2.2: a server routes by it, not by Host) becomes C{host} as well. With
    no C{host}, the head stays as it is.

    @return: the method, the new head, the state after it, and the body
        length for L{State.BODY}.
    @raise Malformed: the head is not one it can frame.
    """
    lines = head.split(b"\n")
    first = lines[0]
    method, target, minor = _request_line(first.removesuffix(b"\r"))
    # (start, stop, replacement) in increasing order of position in head.
    edits: list[tuple[int, int, bytes]] = []
    if host is not None and method != b"CONNECT":
        absolute = _ABSOLUTE_FORM.match(target)
        if absolute is not None:
            start, stop = absolute.span(1)
            edits.append((len(method) + 1 + start, len(method) + 1 + stop, host))
    found = headers(head, lines, _REQUEST_HEADERS)
    hosts = found.get(b"host", [])
    if host is not None:
        for n, line in enumerate(hosts):
            if n:
                edits.append((line.start, line.stop, b""))
            else:
                stripped = line.value.lstrip(_OWS)
                start = line.value_start + len(line.value) - len(stripped)
                edits.append((start, start + len(stripped.rstrip(_OWS)), host))
        if not hosts:
            eol = b"\r\n" if first.endswith(b"\r") else b"\n"
            at = len(first) + 1
            edits.append((at, at, b"Host: " + host + eol))
    rewritten = apply_edits(head, edits) if edits else head

    lengths = values(found, b"content-length")
    codings = values(found, b"transfer-encoding")
    upgrade = b"upgrade" in found
    if method == b"CONNECT" or (
        upgrade and b"upgrade" in tokens(values(found, b"connection"))
    ):
        return method, rewritten, State.PASSTHROUGH, 0
    if codings:
        if minor == b"0":
            raise Malformed("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise Malformed("both Content-Length and Transfer-Encoding")
        if tokens(codings)[-1] != b"chunked":
            shown = show(b", ".join(codings))
            raise Malformed(f"Transfer-Encoding {shown} does not end in chunked")
        return method, rewritten, State.CHUNK_SIZE, 0
    if lengths:
        length = content_length(lengths)
        if length:
            return method, rewritten, State.BODY, length
    return method, rewritten, State.HEAD, 0
