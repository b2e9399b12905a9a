"""
A process on the other end of the control socket, as another user, for the
tests that need the kernel to see a real peer (L{ngrokd.test.test_control}).

Run as root: C{python -m ngrokd.test.controlpeer --uid U --gid G [--groups
A,B] SOCKET ACTION}. It becomes C{U}, C{G} and the supplementary groups,
keeping root as its saved uid so that it may change its groups later, then:

  - C{hold N}: opens C{N} connections, greets the daemon on each, prints
    C{held}, and keeps them until its standard input closes;
  - C{reload [--join GID]}: connects, then (with C{--join}) joins C{GID}
    before asking anything, asks for a reload and prints C{answered} or
    the error code.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys

from twisted.protocols.amp import AmpBox


def read_box(sock: socket.socket) -> dict[bytes, bytes]:
    """
    One AMP box from C{sock}.
    """
    box: dict[bytes, bytes] = {}
    while True:
        key = _read(sock, struct.unpack("!H", _read(sock, 2))[0])
        if not key:
            return box
        box[key] = _read(sock, struct.unpack("!H", _read(sock, 2))[0])


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            raise EOFError("the daemon closed the connection")
        data += more
    return data


def ask(sock: socket.socket, command: bytes, **arguments: bytes) -> dict[bytes, bytes]:
    """
    Send C{command} and read its answer.
    """
    box = AmpBox(_command=command, _ask=b"1", **arguments)
    sock.sendall(box.serialize())
    return read_box(sock)


def connected(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)  # blocking: a non-blocking one fails on a full backlog
    sock.settimeout(30)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--groups", default="")
    parser.add_argument("socket")
    parser.add_argument("action", choices=["hold", "reload"])
    parser.add_argument("count", type=int, nargs="?", default=1)
    parser.add_argument("--join", type=int)
    args = parser.parse_args()
    os.setgroups([int(g) for g in args.groups.split(",") if g])
    os.setresgid(args.gid, args.gid, 0)
    os.setresuid(args.uid, args.uid, 0)
    if args.action == "hold":
        held = []
        for _ in range(args.count):
            held.append(connected(args.socket))
            ask(held[-1], b"Hello", version=b"1")
        print("held", flush=True)
        sys.stdin.read()
        return
    sock = connected(args.socket)
    if args.join is not None:
        os.seteuid(0)
        os.setgroups([args.join])
        os.seteuid(args.uid)
    answer = ask(sock, b"Reload")
    print(answer.get(b"_error_code", b"answered").decode(), flush=True)


if __name__ == "__main__":
    main()
