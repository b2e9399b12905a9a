"""
A paced DNS flood, for C{bench/dns.py --flood}: C{python bench/_flood.py
PORT RATE SOURCES SECONDS QUERIES RESULT} sends the pre-built queries of
file C{QUERIES} (one hex-encoded query a line, cycled, each with a new id)
to 127.0.0.1 port PORT at RATE queries a second in all, spread evenly over
SOURCES UDP sockets bound to 127.0.0.2, 127.0.0.3 and on (so a server's
per-source rate limit sees SOURCES clients), for at most SECONDS or until
SIGTERM. It counts the answers by rcode (unanswered queries are the rest)
and writes the counts to C{RESULT} as JSON when it stops.

Pacing: every millisecond it sends what is due by then, so the rate holds
over any span longer than that; the answers are read between sends.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

#: The most queries sent in one go, should the sender fall behind.
BATCH = 1000
#: How long answers are still read after the last query.
DRAIN_SECONDS = 1.0
#: What each rcode is called.
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def main(argv: list[str]) -> int:
    port, rate, sources = int(argv[0]), float(argv[1]), int(argv[2])
    seconds, queries_path, result = float(argv[3]), Path(argv[4]), Path(argv[5])
    queries = [bytes.fromhex(line) for line in queries_path.read_text().split()]
    sockets = []
    for index in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((f"127.0.0.{2 + index}", 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        sockets.append(sock)
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    answers: Counter[str] = Counter()
    sent = blocked = 0

    def drain() -> None:
        for sock in sockets:
            while True:
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                rcode = data[3] & 0xF if len(data) > 3 else -1
                answers[RCODES.get(rcode, f"rcode {rcode}")] += 1

    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    ident = 0
    while not stopped and (now := clock()) < deadline:
        due = min(int((now - start) * rate), sent + BATCH)
        while sent < due:
            ident = (ident + 1) & 0xFFFF
            query = queries[sent % len(queries)]
            try:
                sockets[sent % sources].send(ident.to_bytes(2, "big") + query[2:])
            except BlockingIOError:
                blocked += 1
            sent += 1
        drain()
        select.select(sockets, [], [], 0.001)
    elapsed = clock() - start
    end = clock() + DRAIN_SECONDS
    while clock() < end:
        drain()
        select.select(sockets, [], [], 0.01)
    result.write_text(
        json.dumps(
            {
                "seconds": elapsed,
                "sent": sent,
                "send_blocked": blocked,
                "answers": dict(answers),
                "sources": sources,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
