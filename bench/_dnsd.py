"""
ngrokd's DNS server alone, for C{bench/dns.py}: C{python bench/_dnsd.py
PORT UPSTREAM_PORT HOSTS [CACHED_ANSWERS]} serves the names of a hosts file
(C{ADDRESS NAME} lines) on 127.0.0.1 port PORT, UDP and TCP, and forwards
other names to 127.0.0.1 port UPSTREAM_PORT.

It runs L{ngrokd.dns.service.DNSService} with its default limits but the
per-source rate, which is off: the benchmark's single client is the flood.
"""

from __future__ import annotations

import sys
from ipaddress import ip_address
from pathlib import Path

from attrs import evolve
from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402

from ngrokd.dns.server import DEFAULT_LIMITS  # noqa: E402
from ngrokd.dns.service import DNSService  # noqa: E402
from ngrokd.dns.table import IPAddress, build_table  # noqa: E402


def main(argv: list[str]) -> None:
    port, upstream, hosts = int(argv[0]), int(argv[1]), Path(argv[2])
    limits = evolve(DEFAULT_LIMITS, rate=None)
    if len(argv) > 3:
        limits = evolve(limits, cached_answers=int(argv[3]))
    entries: dict[str, list[IPAddress]] = {}
    for line in hosts.read_text().splitlines():
        address, name = line.split()
        entries.setdefault(name, []).append(ip_address(address))
    service = DNSService(
        [("127.0.0.1", port)],
        [("127.0.0.1", upstream)],
        reactor,
        limits,
        build_table(entries),
    )
    service.startService()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
