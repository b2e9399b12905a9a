# -*- test-case-name: ngrokd.test.test_httprewrite -*-
"""
Give every HTTP/1.x request on a local connection the bound endpoint's C{Host}.

In network mode a local client reaches an endpoint through an address such as
C{localhost:9080}, so its requests say C{Host: localhost:9080}; ngrok routes
HTTP endpoints by C{Host}, so every request must name the endpoint instead. The
Go original rewrote only the first request, re-serialised it (adding a
User-Agent), sent nothing back until that request's whole body was sent, and
dropped the bytes it had buffered when parsing failed (seed-spec faults 5, 6).

L{HostRewriter} is a sans-IO filter over the client-to-server byte stream. It
holds back only request heads (at most L{MAX_HEAD} bytes) and single lines of
chunked framing; body bytes are sliced through as they arrive, so
C{Expect: 100-continue} and full-duplex exchanges never stall (a client that
gets a final answer instead of 100 still sends the body or closes, RFC 9110
section 10.1.1, so the framing holds). In each head the first Host value
becomes the endpoint's, later Host lines go, a missing one is added, and an
absolute-form target's authority becomes the endpoint's; every other byte
passes exactly as the client sent it.

It sees only the request side. After a request that may switch protocols
(C{CONNECT}, or C{Upgrade} with C{Connection: upgrade}) it cannot tell whether
the server agreed (the 101 or 2xx goes the other way), and the bytes after a
switch are not HTTP, so it stops parsing and passes everything through:
rewriting inside a WebSocket or tunnel would corrupt it, whereas a request
that follows a refused upgrade only keeps the client's own Host.

A request it cannot frame with certainty (not HTTP/1.x, a malformed head, an
invalid or ambiguous length, a head over L{MAX_HEAD}) is treated the same way:
it returns every byte it was holding, unchanged, passes the rest of the stream
through, and names the reason in L{HostRewriter.gave_up} for the caller to log
once. Guessing where a request ends and rewriting there could corrupt a body
or forge a request; passing through loses only the rewrite.
"""

from __future__ import annotations

import enum
import re

MAX_HEAD = 64 * 1024
"""
The largest request head (request line, header lines and the blank line) it
holds back, and the longest line of chunked framing (size line or trailer).
"""

_TOKEN_CHARS = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHAR = frozenset(
    b"!#$%&'*+-.^_`|~0123456789" + bytes(range(65, 91)) + bytes(range(97, 123))
)
_TOKEN = re.compile(b"[" + _TOKEN_CHARS + b"]+")
_REQUEST_LINE = re.compile(
    b"([" + _TOKEN_CHARS + rb"]+) ([^\x00-\x20\x7f]+) HTTP/1\.([0-9])"
)
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#@]*@)?([^/?#]*)")
_DIGITS = re.compile(rb"[0-9]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\x00]*)?")
_OWS = b" \t"


class InvalidHost(ValueError):
    """
    The Host value to write is not one an HTTP header or URL authority can
    carry.
    """


class _Malformed(Exception):
    """
    The request stream cannot be framed; the message says why.
    """


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()
    TRAILER = enum.auto()
    PASSTHROUGH = enum.auto()


class HostRewriter:
    """
    Rewrites the Host of each request in one connection's client-to-server
    stream (keep-alive and pipelined requests alike).

    Feed it the client's bytes as they arrive and write what C{feed} returns
    upstream as one write. When the client has finished sending, write what
    C{finish} returns. Once L{passthrough} is true every later C{feed} returns
    its input unchanged.
    """

    def __init__(self, host: str) -> None:
        """
        @param host: the exact C{Host} value every request gets, such as
            C{web.prod} or C{web.prod:8080} for a URL with a non-default port.
        @raise InvalidHost: C{host} is empty, not ASCII, or has whitespace,
            controls or URL delimiters in it.
        """
        self._host = _encode_host(host)
        self._state = _State.HEAD
        self._buffer = bytearray()
        self._first_line_checked = False
        self._remaining = 0
        self._gave_up: str | None = None

    @property
    def passthrough(self) -> bool:
        """
        Whether it has stopped parsing: after a protocol switch, a request it
        could not frame (then L{gave_up} says why), or C{finish}.
        """
        return self._state is _State.PASSTHROUGH

    @property
    def gave_up(self) -> str | None:
        """
        Why it stopped rewriting because the stream was not HTTP it could
        frame, or C{None} while it has not.
        """
        return self._gave_up

    def feed(self, data: bytes) -> bytes:
        """
        Take the next bytes from the client.

        @return: the bytes to send upstream now (possibly empty while a head
            is incomplete): every byte fed so far, in order, except those
            still held back, with the Host of each complete head rewritten.
        """
        if self.passthrough:
            return data
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state is _State.BODY or state is _State.CHUNK_DATA:
                pos = self._body(data, pos, out)
            elif state is _State.HEAD:
                pos = self._head(data, pos, out)
            elif state is _State.PASSTHROUGH:
                out.append(data[pos:])
                break
            else:
                pos = self._framing_line(data, pos, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """
        The client has finished sending: return the bytes still held back (an
        incomplete head or framing line), unchanged, and stop parsing.
        """
        held = bytes(self._buffer)
        self._buffer.clear()
        self._state = _State.PASSTHROUGH
        return held

    def _give_up(self, reason: str, data: bytes, pos: int, out: list[bytes]) -> int:
        """
        Switch to passthrough: emit the held-back bytes and C{data[pos:]}.
        """
        self._gave_up = reason
        self._state = _State.PASSTHROUGH
        if self._buffer:
            out.append(bytes(self._buffer))
            self._buffer.clear()
        out.append(data[pos:])
        return len(data)

    def _body(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """
        Pass up to the rest of a C{Content-Length} body or of a chunk.
        """
        available = len(data) - pos
        after = _State.HEAD if self._state is _State.BODY else _State.CHUNK_END
        if available < self._remaining:
            out.append(data[pos:])
            self._remaining -= available
            return len(data)
        stop = pos + self._remaining
        out.append(data[pos:stop])
        self._remaining = 0
        self._state = after
        return stop

    def _head(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """
        Collect a request head; once complete, emit it rewritten.
        """
        end = len(data)
        buf = self._buffer
        if buf == b"\r" and data[pos] == 0x0A:
            out.append(b"\r\n")
            buf.clear()
            pos += 1
        if not buf:
            pos = _skip_blank_lines(data, pos, out)
            if pos == end:
                return end
            limit = min(end, pos + MAX_HEAD)
            stop = _head_end(data, pos, limit)
            if stop < 0:
                if limit - pos >= MAX_HEAD:
                    return self._give_up(_TOO_LARGE, data, pos, out)
                try:
                    self._first_line_checked = _check_start(data, pos, pos)
                except _Malformed as e:
                    return self._give_up(str(e), data, pos, out)
                buf += data[pos:]
                return end
            head = data[pos:stop]
            pos = stop
        else:
            held = len(buf)
            take = data[pos : pos + MAX_HEAD - held]
            buf += take
            stop = _head_end(buf, max(0, held - 2), len(buf))
            if stop < 0:
                pos += len(take)
                if len(buf) >= MAX_HEAD:
                    return self._give_up(_TOO_LARGE, data, pos, out)
                if not self._first_line_checked:
                    try:
                        self._first_line_checked = _check_start(buf, 0, held)
                    except _Malformed as e:
                        return self._give_up(str(e), data, pos, out)
                return pos
            head = bytes(buf[:stop])
            pos += stop - held
            buf.clear()
        try:
            rewritten, self._state, self._remaining = _rewrite_head(head, self._host)
        except _Malformed as e:
            out.append(head)
            return self._give_up(str(e), data, pos, out)
        out.append(rewritten)
        return pos

    def _framing_line(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """
        Pass one line of chunked framing: a chunk-size line, the line end after
        a chunk's data, or a trailer line (the blank one ends the request).
        """
        buf = self._buffer
        room = MAX_HEAD - len(buf)
        newline = data.find(b"\n", pos, pos + room)
        if newline < 0:
            if len(data) - pos >= room:
                reason = f"chunked framing line longer than {MAX_HEAD} bytes"
                return self._give_up(reason, data, pos, out)
            buf += data[pos:]
            return len(data)
        stop = newline + 1
        if buf:
            buf += data[pos:stop]
            line = bytes(buf)
            buf.clear()
        else:
            line = data[pos:stop]
        content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        state = self._state
        if state is _State.CHUNK_SIZE:
            size = _CHUNK_SIZE.fullmatch(content)
            if size is None:
                out.append(line)
                reason = f"invalid chunk-size line {_show(content)}"
                return self._give_up(reason, data, stop, out)
            self._remaining = int(size.group(1), 16)
            self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILER
        elif state is _State.CHUNK_END:
            if content:
                out.append(line)
                reason = f"chunk data followed by {_show(content)}, not a line end"
                return self._give_up(reason, data, stop, out)
            self._state = _State.CHUNK_SIZE
        elif not content:
            self._state = _State.HEAD
        out.append(line)
        return stop


_TOO_LARGE = f"request head larger than {MAX_HEAD} bytes"


def _encode_host(host: str) -> bytes:
    try:
        encoded = host.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidHost(f"Host {host!r} is not ASCII (use its IDNA form)") from None
    if not encoded or re.search(rb"[^\x21-\x7e]|[/?#@]", encoded):
        raise InvalidHost(f"{host!r} is not a valid Host value")
    return encoded


def _show(value: bytes | bytearray) -> str:
    """
    A short printable form of client bytes for a reason message.
    """
    text = repr(bytes(value[:60]))
    return text + "..." if len(value) > 60 else text


def _skip_blank_lines(data: bytes, pos: int, out: list[bytes]) -> int:
    """
    Pass the empty lines a client may send before a request line (RFC 9112
    section 2.2); servers ignore them.
    """
    start = pos
    end = len(data)
    while pos < end:
        if data[pos] == 0x0A:
            pos += 1
        elif data.startswith(b"\r\n", pos):
            pos += 2
        else:
            break
    if pos > start:
        out.append(data[start:pos])
    return pos


def _head_end(data: bytes | bytearray, start: int, stop: int) -> int:
    """
    The index just past the first blank line in C{data[start:stop]}, whose lines
    end in CRLF or a bare LF, or -1.
    """
    crlf = data.find(b"\n\r\n", start, stop)
    lf = data.find(b"\n\n", start, crlf + 2 if crlf >= 0 else stop)
    if lf >= 0:
        return lf + 2
    if crlf >= 0:
        return crlf + 3
    return -1


def _check_start(held: bytes | bytearray, first: int, search_from: int) -> bool:
    """
    Check that an incomplete head can still become a request, so that a client
    speaking another protocol (TLS, SSH...) is passed through at once instead
    of waiting for a blank line that never comes.

    @param first: where the head starts in C{held}.
    @param search_from: where its first line end may be; no earlier byte is one.
    @return: whether the request line is complete (and valid).
    @raise _Malformed: it cannot become a request.
    """
    if held[first] not in _TCHAR:
        if len(held) - first == 1 and held[first] == 0x0D:
            return False
        shown = _show(held[first : first + 61])
        raise _Malformed(f"request starts with {shown}, not a method")
    newline = held.find(b"\n", search_from)
    if newline < 0:
        return False
    _request_line(held[first:newline])
    return True


def _request_line(raw: bytes | bytearray) -> tuple[bytes, bytes, bytes]:
    """
    Method, target and minor version of a request line (its line end removed,
    but for a CR).
    """
    line = raw[:-1] if raw.endswith(b"\r") else raw
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _Malformed(f"request line {_show(line)} is not HTTP/1.x")
    method, target, minor = match.groups()
    return bytes(method), bytes(target), bytes(minor)


def _tokens(values: list[bytes]) -> list[bytes]:
    """
    The lower-cased elements of a comma-separated header, over all its lines.
    """
    return [item.strip(_OWS).lower() for value in values for item in value.split(b",")]


def _rewrite_head(head: bytes, host: bytes) -> tuple[bytes, _State, int]:
    """
    Rewrite a complete request head and say how its body is framed.

    The first Host header gets C{host} as its value (name, spacing and line end
    kept), later ones are removed, and one is inserted after the request line
    when there is none. An absolute-form target's authority (RFC 9112 section
    3.2.2: a server routes by it, not by Host) becomes C{host} as well.

    @return: the new head, the state after it, and the body length for
        L{_State.BODY}.
    @raise _Malformed: the head is not one it can frame.
    """
    lines = head.split(b"\n")
    first = lines[0]
    method, target, minor = _request_line(first)
    # (start, stop, replacement) in increasing order of position in head.
    edits: list[tuple[int, int, bytes]] = []
    if method != b"CONNECT":
        absolute = _ABSOLUTE_FORM.match(target)
        if absolute is not None:
            start, stop = absolute.span(1)
            edits.append((len(method) + 1 + start, len(method) + 1 + stop, host))
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade = False
    seen_host = False
    offset = len(first) + 1
    for raw in lines[1:-2]:
        line_start = offset
        offset += len(raw) + 1
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise _Malformed(f"obsolete line folding in header line {_show(line)}")
        colon = line.find(b":")
        if colon < 0:
            raise _Malformed(f"header line {_show(line)} has no colon")
        name = line[:colon]
        if _TOKEN.fullmatch(name) is None:
            raise _Malformed(f"invalid header name {_show(name)}")
        value = line[colon + 1 :]
        if b"\r" in value or b"\x00" in value:
            raise _Malformed(f"header {_show(name)} has a CR or NUL in its value")
        lname = name.lower()
        if lname == b"host":
            if seen_host:
                edits.append((line_start, offset, b""))
            else:
                seen_host = True
                stripped = value.lstrip(_OWS)
                value_start = line_start + colon + 1 + len(value) - len(stripped)
                value_stop = value_start + len(stripped.rstrip(_OWS))
                edits.append((value_start, value_stop, host))
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname == b"connection":
            connection.append(value)
        elif lname == b"upgrade":
            upgrade = True
    if not seen_host:
        eol = b"\r\n" if first.endswith(b"\r") else b"\n"
        at = len(first) + 1
        edits.append((at, at, b"Host: " + host + eol))

    pieces: list[bytes] = []
    copied = 0
    for start, stop, replacement in edits:
        pieces.append(head[copied:start])
        pieces.append(replacement)
        copied = stop
    pieces.append(head[copied:])
    rewritten = b"".join(pieces)

    if method == b"CONNECT" or (upgrade and b"upgrade" in _tokens(connection)):
        return rewritten, _State.PASSTHROUGH, 0
    if codings:
        if minor == b"0":
            raise _Malformed("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise _Malformed("both Content-Length and Transfer-Encoding")
        if _tokens(codings)[-1] != b"chunked":
            shown = _show(b", ".join(codings))
            raise _Malformed(f"Transfer-Encoding {shown} does not end in chunked")
        return rewritten, _State.CHUNK_SIZE, 0
    if lengths:
        values = set()
        for item in lengths:
            for number in item.split(b","):
                digits = number.strip(_OWS)
                if _DIGITS.fullmatch(digits) is None:
                    raise _Malformed(f"Content-Length {_show(item)} is not a number")
                values.add(int(digits))
        if len(values) != 1:
            shown = _show(b", ".join(lengths))
            raise _Malformed(f"conflicting Content-Length values {shown}")
        (length,) = values
        if length:
            return rewritten, _State.BODY, length
    return rewritten, _State.HEAD, 0
