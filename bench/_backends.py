"""
The data-path benchmark's backends: an echo server and a source server.

C{bench/datapath.py} runs this file as a process of its own (C{python
bench/_backends.py PORTFILE}), so that serving the load costs neither the
daemon nor the load client any CPU. Both servers listen on 127.0.0.1 ports
the kernel picks; once they listen, their ports are written to PORTFILE as
JSON C{{"echo": PORT, "source": PORT}} (atomically: the file appears whole).

The echo server writes back whatever it reads and closes after the client's
EOF. The source server reads an 8-byte big-endian count, sends that many
bytes in 256 KiB writes, then closes its write side and closes for good when
the client has closed too. Both pause reading (echo) or writing (source) when
the kernel stops taking bytes, so a slow client never makes them buffer more
than C{WRITE_BUFFER_HIGH}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys

#: The source server's request: the number of bytes to send.
COUNT = struct.Struct(">Q")

CHUNK = 256 * 1024
WRITE_BUFFER_HIGH = 1024 * 1024
BACKLOG = 4096

_ZEROS = memoryview(bytes(CHUNK))


def _fast(transport: asyncio.BaseTransport) -> asyncio.Transport:
    assert isinstance(transport, asyncio.Transport)
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
    return transport


class Echo(asyncio.Protocol):
    """
    Writes back what it reads; closes (after flushing) on the client's EOF.
    """

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _fast(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False


class Source(asyncio.Protocol):
    """
    Sends as many bytes as the client's 8-byte request asks for, then EOF.
    """

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._request = b""
        self._remaining: int | None = None
        self._paused = False
        self._sent_all = False
        self._client_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _fast(transport)

    def data_received(self, data: bytes) -> None:
        if self._remaining is not None:
            print("source: bytes after the request, closing", file=sys.stderr)
            self.transport.abort()
            return
        self._request += data
        if len(self._request) < COUNT.size:
            return
        if len(self._request) > COUNT.size:
            print("source: request longer than 8 bytes, closing", file=sys.stderr)
            self.transport.abort()
            return
        (self._remaining,) = COUNT.unpack(self._request)
        self._send()

    def _send(self) -> None:
        assert self._remaining is not None
        while self._remaining > 0 and not self._paused:
            n = min(CHUNK, self._remaining)
            self._remaining -= n
            # write() may call pause_writing() before it returns.
            self.transport.write(_ZEROS[:n])
        if self._remaining == 0 and not self._sent_all:
            self._sent_all = True
            self.transport.write_eof()
            if self._client_done:
                self.transport.close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._remaining:
            self._send()

    def eof_received(self) -> bool:
        self._client_done = True
        # Keep the write side open until every byte asked for is sent.
        return not self._sent_all


def write_portfile(path: str, ports: dict[str, int]) -> None:
    """
    Write C{ports} to C{path} as JSON, atomically: the file appears whole.
    """
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(ports, f)
    os.replace(partial, path)


def listening_port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def serve(portfile: str) -> None:
    """
    Listen, announce the ports in C{portfile}, serve until killed.
    """
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, "127.0.0.1", 0, backlog=BACKLOG)
    source = await loop.create_server(Source, "127.0.0.1", 0, backlog=BACKLOG)
    write_portfile(
        portfile, {"echo": listening_port(echo), "source": listening_port(source)}
    )
    async with echo, source:
        await asyncio.gather(echo.serve_forever(), source.serve_forever())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} PORTFILE", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(argv[1]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
