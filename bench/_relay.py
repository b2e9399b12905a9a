"""
The data-path benchmark's simulated WAN link: a TCP relay that delays bytes.

C{bench/datapath.py} runs this file as a process of its own with
C{--delay}:

    python bench/_relay.py DELAY_MS PORTFILE NAME=PORT [NAME=PORT ...]

For each route it listens on a 127.0.0.1 port the kernel picks and relays
every accepted connection to 127.0.0.1:PORT; once all listen, it writes
C{{NAME: listening port}} to PORTFILE as JSON (atomically).

Each direction of a relayed connection is a one-way link of DELAY_MS
milliseconds: every chunk read from one side is written to the other
DELAY_MS later, in order, and so are an EOF (a half-close: the other
direction goes on) and a reset (the other side is reset too, with
C{SO_LINGER} zero). A TCP handshake costs a round trip, as on a real link:
the relay connects to the target DELAY_MS after the accept (the SYN's
way), and reads what the client sent only DELAY_MS after that (the
SYN-ACK's way back), so the client's first bytes reach the target three
one-way delays after its connect, as they would across a WAN. A refused
connect resets the client when the SYN-ACK would have come back.

At most C{WINDOW} bytes per direction are in flight (waiting for their
time, or in the writing side's buffer): beyond that, reading from the
sending side pauses, so one connection moves at most C{WINDOW} bytes per
delay. asyncio's timers wake in whole milliseconds (epoll): each chunk
arrives within about half a millisecond of its due time.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import sys
from collections import deque

from _backends import BACKLOG, listening_port, write_portfile

LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024
#: Bytes in flight per direction before reading from the sender pauses.
WINDOW = 4 * MiB
#: When reading resumes: the bytes in flight fell to this.
WINDOW_LOW = WINDOW // 2
WRITE_BUFFER_HIGH = 256 * 1024
#: Seconds the connect to a target may take (after its delay).
CONNECT_TIMEOUT = 10.0
#: asyncio's timers wake up to a millisecond late (epoll counts whole
#: milliseconds), so a chunk's timer is set half of that before it is due
#: and delivers what is due within the next half: within about half a
#: millisecond of its time, early or late, instead of up to one late.
_EARLY = 0.0005
#: SO_LINGER on, zero seconds: close() sends a reset, not an EOF.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


EOF = _Signal("EOF")
RESET = _Signal("RESET")


class Side(asyncio.Protocol):
    """
    One of a relayed connection's two TCP connections: the client's, or the
    one to the target. What it reads goes into C{outgoing}.
    """

    transport: asyncio.Transport
    outgoing: Lane
    incoming: Lane

    def __init__(self) -> None:
        self.eof_read = False
        self.eof_written = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.eof_read = True
        self.outgoing.push(EOF)
        self.close_when_done()
        return True  # the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.outgoing.push(RESET)

    def resume_writing(self) -> None:
        self.incoming.resume_if_drained()

    def write_eof(self) -> None:
        self.eof_written = True
        self.transport.write_eof()
        self.close_when_done()

    def close_when_done(self) -> None:
        """
        Close once both directions have ended (after flushing).
        """
        if self.eof_read and self.eof_written:
            self.transport.close()

    def reset(self) -> None:
        self.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE
        )
        self.transport.abort()


class Lane:
    """
    One direction of a relayed connection: what C{source} reads, written to
    C{sink} C{delay} seconds later, in order.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, source: Side, sink: Side
    ) -> None:
        self._loop = loop
        self._delay = delay
        self._source = source
        self._sink = sink
        self._queue: deque[tuple[float, bytes | _Signal]] = deque()
        self._queued_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        source.outgoing = self
        sink.incoming = self

    def _in_flight(self) -> int:
        return self._queued_bytes + self._sink.transport.get_write_buffer_size()

    def push(self, item: bytes | _Signal) -> None:
        due = self._loop.time() + self._delay
        self._queue.append((due, item))
        if isinstance(item, bytes):
            self._queued_bytes += len(item)
            if not self._paused and self._in_flight() > WINDOW:
                self._paused = True
                self._source.transport.pause_reading()
        if self._timer is None:
            self._timer = self._loop.call_at(due - _EARLY, self._deliver)

    def _deliver(self) -> None:
        self._timer = None
        now = self._loop.time() + _EARLY
        sink = self._sink
        while self._queue and self._queue[0][0] <= now:
            _, item = self._queue.popleft()
            if isinstance(item, bytes):
                self._queued_bytes -= len(item)
            if sink.transport.is_closing():
                continue  # reset or closed: what was in flight is lost
            if item is EOF:
                sink.write_eof()
            elif item is RESET:
                sink.reset()
            else:
                assert isinstance(item, bytes)
                sink.transport.write(item)
        if self._queue:
            self._timer = self._loop.call_at(self._queue[0][0] - _EARLY, self._deliver)
        self.resume_if_drained()

    def resume_if_drained(self) -> None:
        if self._paused and self._in_flight() <= WINDOW_LOW:
            self._paused = False
            if not self._source.transport.is_closing():
                self._source.transport.resume_reading()


class Client(Side):
    """
    The accepted connection: connects to the target a delay later, reads
    another delay after that.
    """

    def __init__(self, delay: float, target: int) -> None:
        super().__init__()
        self._delay = delay
        self._target = target
        self._server = Side()
        self._connecting: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        Lane(loop, delay, self, self._server)
        Lane(loop, delay, self._server, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(self._delay, self._start_connect)

    def _start_connect(self) -> None:
        if not self.transport.is_closing():
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: self._server, LOOPBACK, self._target
                )
        except (OSError, TimeoutError):
            loop.call_later(self._delay, self._refused)
        else:
            loop.call_later(self._delay, self._established)

    def _refused(self) -> None:
        if not self.transport.is_closing():
            self.reset()

    def _established(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()


def _route(text: str) -> tuple[str, int]:
    name, _, port = text.partition("=")
    if not name or not port.isdigit():
        raise ValueError(f"{text!r} is not NAME=PORT")
    return name, int(port)


async def serve(delay: float, portfile: str, routes: dict[str, int]) -> None:
    """
    Listen for each route, announce the ports in C{portfile}, relay until
    killed.
    """
    loop = asyncio.get_running_loop()
    servers = {
        name: await loop.create_server(
            functools.partial(Client, delay, target), LOOPBACK, 0, backlog=BACKLOG
        )
        for name, target in routes.items()
    }
    write_portfile(
        portfile, {name: listening_port(server) for name, server in servers.items()}
    )
    await asyncio.gather(*(server.serve_forever() for server in servers.values()))


def main(argv: list[str]) -> int:
    try:
        delay_ms = float(argv[1])
        if not 0 <= delay_ms < 60_000:
            raise ValueError(f"{argv[1]} is not a delay in milliseconds")
        portfile = argv[2]
        routes = dict(_route(arg) for arg in argv[3:])
        if not routes:
            raise ValueError("no route")
    except (IndexError, ValueError) as e:
        print(f"usage: {argv[0]} DELAY_MS PORTFILE NAME=PORT...: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(delay_ms / 1000, portfile, routes))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
