"""
A devcloud with many bound endpoints, in a process of its own, for
C{bench/observe.py}:

    python bench/_cloud.py STATE COUNT ECHO_PORT START_PORT

It binds C{tcp://echo.bench:7} to the echo backend on 127.0.0.1:ECHO_PORT
and COUNT - 1 more endpoints (C{tcp://dbN.nsM:5432}, to 127.0.0.1:9: none
is dialled), lists them 100 to a page, and writes STATE/ngrokd.yml (ngrokd's
listeners from START_PORT in network mode) and STATE/devcloud.json. It runs
until SIGTERM.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from ngrokd.devcloud.tap import start_devcloud

ECHO_URL = "tcp://echo.bench:7"
PAGE_SIZE = 100


def endpoint_urls(count: int) -> list[str]:
    """
    The echo endpoint and C{count} - 1 others, over 50 namespaces.
    """
    return [ECHO_URL] + [f"tcp://db{n}.ns{n % 50}:5432" for n in range(1, count)]


def main(argv: list[str]) -> int:
    state, count, echo_port, start_port = argv[0], *map(int, argv[1:4])
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    backends = [("127.0.0.1", echo_port)] + [("127.0.0.1", 9)] * (count - 1)
    running = start_devcloud(
        reactor,
        state,
        zip(endpoint_urls(count), backends, strict=True),
        start_port=start_port,
    )
    running.cloud.page_size = PAGE_SIZE
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
