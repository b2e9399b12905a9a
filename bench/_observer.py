"""
Someone looking at the daemon, in a process of its own, for
C{bench/observe.py}:

    python bench/_observer.py HOST:PORT

as an operator with Prometheus and the web page open would: four C{/events}
streams held open (each read as it comes, opened again when the server
ends it), and once a second C{/metrics}, C{/status} and C{/} fetched one
after the other, each timed from the request to the last byte of its
answer (one that fails is recorded with -1 seconds). It says C{ready} on
stdout once the streams are open and the first round is done, and when its
stdin closes it prints every request's path, seconds and size as one JSON
line and exits. Only the standard library:
nothing here shares the daemon's code.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

STREAMS = 4
PATHS = ("/metrics", "/status", "/")
INTERVAL = 1.0
TIMEOUT = 60.0


def fetch(host: str, port: int, path: str) -> tuple[float, int]:
    """
    GET C{path} on a new connection: seconds to the last byte, and bytes.
    """
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started, len(body)


def stream(
    host: str, port: int, stop: threading.Event, opened: threading.Event
) -> None:
    """
    Hold C{/events} open, reading it, until C{stop}.
    """
    while not stop.is_set():
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            connection.request("GET", "/events")
            response = connection.getresponse()
            opened.set()
            while not stop.is_set() and response.readline():
                pass
        except OSError:
            time.sleep(0.5)
        finally:
            connection.close()


def main(argv: list[str]) -> int:
    host, _, port_text = argv[0].rpartition(":")
    port = int(port_text)
    stop = threading.Event()
    streams = []
    for _ in range(STREAMS):
        opened = threading.Event()
        thread = threading.Thread(
            target=stream, args=(host, port, stop, opened), daemon=True
        )
        thread.start()
        streams.append(opened)
    for opened in streams:
        opened.wait(TIMEOUT)
    timings: list[tuple[str, float, int]] = []

    def look() -> None:
        while not stop.is_set():
            began = time.monotonic()
            for path in PATHS:
                try:
                    seconds, size = fetch(host, port, path)
                except OSError:
                    seconds, size = -1.0, 0  # counted as failed
                timings.append((path, seconds, size))
            if len(timings) == len(PATHS):
                print("ready", flush=True)
            stop.wait(max(0.0, INTERVAL - (time.monotonic() - began)))

    looker = threading.Thread(target=look, daemon=True)
    looker.start()
    sys.stdin.read()  # until the benchmark closes it
    stop.set()
    looker.join(TIMEOUT)
    print(json.dumps({"requests": timings}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
