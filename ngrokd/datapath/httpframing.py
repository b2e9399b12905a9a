# -*- test-case-name: ngrokd.test.test_httprewrite,ngrokd.test.test_httpdrain -*-
"""
Where each message begins and ends in one direction of an HTTP/1.x
connection, without holding more than a head.

L{MessageFramer} is the sans-IO framing both directions share: the requests
(L{ngrokd.datapath.httprewrite}) and the responses
(L{ngrokd.datapath.httpdrain}). It holds back only message heads (at most
L{MAX_HEAD} bytes) and single lines of chunked framing; body bytes are sliced
through as they arrive. What a head means, and how it is rewritten, is the
subclass's. A stream it cannot frame with certainty (a malformed head, an
invalid or ambiguous length, a head over L{MAX_HEAD}) is passed through from
there on, every byte it was holding included, and L{MessageFramer.gave_up}
names the reason for the caller to log once: guessing where a message ends
could corrupt a body or forge a message; passing through loses only what the
framing was for.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

MAX_HEAD = 64 * 1024
"""
The largest message head (start line, header lines and the blank line) it
holds back, and the longest line of chunked framing (size line or trailer).
"""

TOKEN_CHARS = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(b"[" + TOKEN_CHARS + b"]+")
_DIGITS = re.compile(rb"[0-9]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\x00]*)?")
#: A chunk's line end and the next size line, as L{_CHUNK_SIZE} takes it.
_NEXT_CHUNK = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n\x00]*)?\r\n")
OWS = b" \t"


class Malformed(Exception):
    """
    The stream cannot be framed; the message says why.
    """


class State(enum.Enum):
    """
    Where a L{MessageFramer} is in its stream.
    """

    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()
    TRAILER = enum.auto()
    PASSTHROUGH = enum.auto()
    #: Stopped at a message boundary: what follows is dropped.
    STOPPED = enum.auto()


class MessageFramer:
    """
    Frames the messages of one direction of a connection, in order.

    Feed it the bytes as they arrive and send on what C{feed} returns as one
    write. When the stream ends, send what C{finish} returns. Once
    L{passthrough} is true every later C{feed} returns its input unchanged.
    """

    #: What its messages are, in reasons: C{request} or C{response}.
    kind = "message"

    def __init__(self) -> None:
        self._state = State.HEAD
        self._buffer = bytearray()
        self._first_line_checked = False
        self._remaining = 0
        self._gave_up: str | None = None

    @property
    def passthrough(self) -> bool:
        """
        Whether it has stopped parsing: after a protocol switch, a stream it
        could not frame (then L{gave_up} says why), or C{finish}.
        """
        return self._state is State.PASSTHROUGH

    @property
    def gave_up(self) -> str | None:
        """
        Why it stopped framing because the stream was not HTTP it could
        frame, or C{None} while it has not.
        """
        return self._gave_up

    @property
    def stopped(self) -> bool:
        """
        Whether it stopped at a message boundary, as the subclass decided,
        and drops every byte after it.
        """
        return self._state is State.STOPPED

    @property
    def between_messages(self) -> bool:
        """
        Whether every message begun so far is complete.
        """
        return (self._state is State.HEAD and not self._buffer) or self.stopped

    def feed(self, data: bytes) -> bytes:
        """
        Take the next bytes of the stream.

        @return: the bytes to send on now (possibly empty while a head is
            incomplete): every byte fed so far, in order, except those still
            held back or dropped after a stop, with each complete head as the
            subclass framed it.
        """
        if self.passthrough:
            return data
        out = _Output(data)
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state is State.BODY or state is State.CHUNK_DATA:
                pos = self._body(data, pos, out)
            elif state is State.HEAD:
                pos = self._head(data, pos, out)
            elif state is State.PASSTHROUGH:
                out.keep(pos, end)
                break
            elif state is State.STOPPED:
                break
            else:
                pos = self._framing_line(data, pos, out)
        return out.result()

    def finish(self) -> bytes:
        """
        The stream has ended: return the bytes still held back (an
        incomplete head or framing line), unchanged, and stop parsing.
        """
        held = bytes(self._buffer)
        self._buffer.clear()
        self._state = State.PASSTHROUGH
        return held

    # What the subclass decides

    def _begin(self) -> bool:
        """
        A message begins (its first byte is here): whether to frame it, or
        to stop before it.
        """
        return True

    def _ended(self) -> State:
        """
        A message has ended: L{State.HEAD} to frame the next one, or
        L{State.STOPPED} to stop here.
        """
        return State.HEAD

    def _check_prefix(self, start: bytes | bytearray) -> None:
        """
        Raise L{Malformed} unless C{start} (the first bytes of a head, up to
        61) can begin a start line.
        """
        raise NotImplementedError

    def _check_start_line(self, line: bytes | bytearray) -> None:
        """
        Raise L{Malformed} unless C{line} (its line end removed, but for a
        CR) is a valid start line.
        """
        raise NotImplementedError

    def _frame(self, head: bytes) -> tuple[bytes, State, int]:
        """
        A complete head: the bytes to send for it, the state after it
        (L{State.HEAD} when the message ends with its head) and the body
        length for L{State.BODY}.

        @raise Malformed: the head is not one it can frame.
        """
        raise NotImplementedError

    # The framing

    def _give_up(self, reason: str, data: bytes, pos: int, out: _Output) -> int:
        """
        Switch to passthrough: emit the held-back bytes and C{data[pos:]}.
        """
        self._gave_up = reason
        self._state = State.PASSTHROUGH
        if self._buffer:
            out.add(bytes(self._buffer))
            self._buffer.clear()
        out.keep(pos, len(data))
        return len(data)

    def _body(self, data: bytes, pos: int, out: _Output) -> int:
        """
        Pass up to the rest of a C{Content-Length} body, or of a chunk and
        those after it whose framing is whole in C{data} (the common case,
        taken without a state change per chunk).
        """
        end = len(data)
        remaining = self._remaining
        while True:
            if end - pos < remaining:
                out.keep(pos, end)
                self._remaining = remaining - (end - pos)
                return end
            stop = pos + remaining
            self._remaining = 0
            if self._state is State.BODY:
                out.keep(pos, stop)
                self._state = self._ended()
                return stop
            following = _NEXT_CHUNK.match(data, stop, stop + MAX_HEAD)
            size = 0 if following is None else int(following.group(1), 16)
            if following is None or not size:
                out.keep(pos, stop)
                self._state = State.CHUNK_END
                return stop
            out.keep(pos, following.end())
            pos, remaining = following.end(), size

    def _head(self, data: bytes, pos: int, out: _Output) -> int:
        """
        Collect a head; once complete, emit it as the subclass frames it.
        """
        end = len(data)
        buf = self._buffer
        if buf == b"\r" and data[pos] == 0x0A:
            out.add(b"\r\n")
            buf.clear()
            pos += 1
        if not buf:
            pos = _skip_blank_lines(data, pos, out)
            if pos == end:
                return end
            lone_cr = end - pos == 1 and data[pos] == 0x0D
            if not lone_cr and not self._begin():
                self._state = State.STOPPED
                return end
            limit = min(end, pos + MAX_HEAD)
            stop = _head_end(data, pos, limit)
            if stop < 0:
                if limit - pos >= MAX_HEAD:
                    return self._give_up(self._too_large(), data, pos, out)
                try:
                    self._first_line_checked = self._check_start(data, pos, pos)
                except Malformed as e:
                    return self._give_up(str(e), data, pos, out)
                buf += data[pos:]
                return end
            head = data[pos:stop]
            pos = stop
            held_back = False
        else:
            held = len(buf)
            take = data[pos : pos + MAX_HEAD - held]
            buf += take
            stop = _head_end(buf, max(0, held - 2), len(buf))
            if stop < 0:
                pos += len(take)
                if len(buf) >= MAX_HEAD:
                    return self._give_up(self._too_large(), data, pos, out)
                if not self._first_line_checked:
                    try:
                        self._first_line_checked = self._check_start(buf, 0, held)
                    except Malformed as e:
                        return self._give_up(str(e), data, pos, out)
                return pos
            head = bytes(buf[:stop])
            pos += stop - held
            buf.clear()
            held_back = True
        try:
            framed, state, self._remaining = self._frame(head)
        except Malformed as e:
            out.add(head)
            return self._give_up(str(e), data, pos, out)
        if framed is head and not held_back:
            out.keep(pos - len(head), pos)
        else:
            out.add(framed)
        self._state = self._ended() if state is State.HEAD else state
        return pos

    def _too_large(self) -> str:
        return f"{self.kind} head larger than {MAX_HEAD} bytes"

    def _check_start(
        self, held: bytes | bytearray, first: int, search_from: int
    ) -> bool:
        """
        Check that an incomplete head can still become a message, so that a
        peer speaking another protocol (TLS, SSH...) is passed through at
        once instead of waiting for a blank line that never comes.

        @param first: where the head starts in C{held}.
        @param search_from: where its first line end may be; no earlier byte
            is one.
        @return: whether the start line is complete (and valid).
        @raise Malformed: it cannot become a message.
        """
        if len(held) - first == 1 and held[first] == 0x0D:
            return False
        self._check_prefix(held[first : first + 61])
        newline = held.find(b"\n", search_from)
        if newline < 0:
            return False
        self._check_start_line(held[first:newline].removesuffix(b"\r"))
        return True

    def _framing_line(self, data: bytes, pos: int, out: _Output) -> int:
        """
        Pass one line of chunked framing: a chunk-size line, the line end after
        a chunk's data, or a trailer line (the blank one ends the message).
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
            out.add(line)
        else:
            line = data[pos:stop]
            out.keep(pos, stop)
        content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        state = self._state
        if state is State.CHUNK_SIZE:
            size = _CHUNK_SIZE.fullmatch(content)
            if size is None:
                reason = f"invalid chunk-size line {show(content)}"
                return self._give_up(reason, data, stop, out)
            self._remaining = int(size.group(1), 16)
            self._state = State.CHUNK_DATA if self._remaining else State.TRAILER
        elif state is State.CHUNK_END:
            if content:
                reason = f"chunk data followed by {show(content)}, not a line end"
                return self._give_up(reason, data, stop, out)
            self._state = State.CHUNK_SIZE
        elif not content:
            self._state = self._ended()
        return stop


class _Output:
    """
    What one C{feed} sends on: runs of its input passed unchanged, kept as
    bounds until needed, and pieces of its own, in order; when it is the
    whole input unchanged (a body, say), the input itself, not a copy.
    """

    __slots__ = ("_data", "_pieces", "_start", "_stop")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pieces: list[bytes] = []
        self._start = self._stop = 0

    def keep(self, start: int, stop: int) -> None:
        """
        Send C{data[start:stop]} unchanged.
        """
        if start != self._stop:
            self._flush()
            self._start = start
        self._stop = stop

    def add(self, piece: bytes) -> None:
        """
        Send C{piece}.
        """
        self._flush()
        self._pieces.append(piece)

    def result(self) -> bytes:
        if not self._pieces and self._start == 0 and self._stop == len(self._data):
            return self._data
        self._flush()
        return b"".join(self._pieces)

    def _flush(self) -> None:
        if self._stop > self._start:
            self._pieces.append(self._data[self._start : self._stop])
        self._start = self._stop


def show(value: bytes | bytearray) -> str:
    """
    A short printable form of a peer's bytes for a reason message.
    """
    text = repr(bytes(value[:60]))
    return text + "..." if len(value) > 60 else text


def _skip_blank_lines(data: bytes, pos: int, out: _Output) -> int:
    """
    Pass the empty lines a peer may send before a start line (RFC 9112
    section 2.2); recipients ignore them.
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
    out.keep(start, pos)
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


def tokens(values: list[bytes]) -> list[bytes]:
    """
    The lower-cased elements of a comma-separated header, over all its lines.
    """
    return [item.strip(OWS).lower() for value in values for item in value.split(b",")]


class Header(NamedTuple):
    """
    One header line of a head: where it starts, where the next line starts,
    where its value starts, and its value (spaces around it kept).
    """

    start: int
    stop: int
    value_start: int
    value: bytes


def headers(
    head: bytes, lines: list[bytes], names: frozenset[bytes]
) -> dict[bytes, list[Header]]:
    """
    The header lines named one of C{names} (lower case) in a complete head
    split into C{lines} at its line feeds, by name, in order; every line is
    checked.

    @raise Malformed: a header line is not one (obsolete line folding, no
        colon, an invalid name, a CR or NUL in the value).
    """
    found: dict[bytes, list[Header]] = {}
    offset = len(lines[0]) + 1
    for raw in lines[1:-2]:
        start = offset
        offset += len(raw) + 1
        line = raw.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"obsolete line folding in header line {show(line)}")
        colon = line.find(b":")
        if colon < 0:
            raise Malformed(f"header line {show(line)} has no colon")
        name = line[:colon]
        if _TOKEN.fullmatch(name) is None:
            raise Malformed(f"invalid header name {show(name)}")
        value = line[colon + 1 :]
        if b"\r" in value or b"\x00" in value:
            raise Malformed(f"header {show(name)} has a CR or NUL in its value")
        name = name.lower()
        if name in names:
            header = Header(start, offset, start + colon + 1, value)
            found.setdefault(name, []).append(header)
    return found


def values(found: dict[bytes, list[Header]], name: bytes) -> list[bytes]:
    """
    The values of the C{name} lines in C{found}.
    """
    return [header.value for header in found.get(name, ())]


def content_length(values: list[bytes]) -> int:
    """
    The length the C{Content-Length} header lines C{values} agree on.

    @raise Malformed: one is not a number, or they differ.
    """
    lengths = set()
    for item in values:
        for number in item.split(b","):
            digits = number.strip(OWS)
            if _DIGITS.fullmatch(digits) is None:
                raise Malformed(f"Content-Length {show(item)} is not a number")
            lengths.add(int(digits))
    if len(lengths) != 1:
        raise Malformed(f"conflicting Content-Length values {show(b', '.join(values))}")
    (length,) = lengths
    return length


def apply_edits(head: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """
    C{head} with each C{(start, stop, replacement)} of C{edits} (in
    increasing order of position, none overlapping) applied.
    """
    pieces: list[bytes] = []
    copied = 0
    for start, stop, replacement in edits:
        pieces.append(head[copied:start])
        pieces.append(replacement)
        copied = stop
    pieces.append(head[copied:])
    return b"".join(pieces)
