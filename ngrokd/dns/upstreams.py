# -*- test-case-name: ngrokd.test.test_dns_upstreams -*-
"""
The servers the DNS server forwards other names to, and the ones it must
never forward to.

Never to itself, and never to systemd-resolved's stubs (127.0.0.53,
127.0.0.54): resolved sends our routing domains to us, so a name under a
wildcard of ours asked of the stub would come back, a loop (the Go ngrokd
forwarded to the stub). The candidates come from resolved's own upstream
list or from a C{resolv.conf}; when none is left, the value says why, for
the status and the log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from attrs import frozen

Address = tuple[str, int]

#: systemd-resolved's stub listeners.
STUBS = frozenset(
    {ipaddress.ip_address("127.0.0.53"), ipaddress.ip_address("127.0.0.54")}
)
#: The port of a C{nameserver} line.
DNS_PORT = 53
#: The most upstream servers kept (glibc itself uses three).
MAX_UPSTREAMS = 8


@frozen
class Upstreams:
    """
    The servers to forward to, in order, and those left out with why.
    """

    servers: tuple[Address, ...]
    skipped: tuple[tuple[Address, str], ...] = ()

    @property
    def reason(self) -> str | None:
        """
        Why there is no server to forward to, or L{None} when there is one.
        """
        if self.servers:
            return None
        if not self.skipped:
            return "no upstream DNS server is configured"
        why = "; ".join(
            f"{host}:{port} {reason}" for (host, port), reason in self.skipped
        )
        return f"no upstream DNS server is usable: {why}"


def _is_ours(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    own: list[Address],
) -> bool:
    for host, own_port in own:
        if port != own_port:
            continue
        mine = ipaddress.ip_address(host) if host else ipaddress.ip_address("0.0.0.0")
        if mine == address or (
            mine.is_unspecified and (address.is_loopback or address.is_unspecified)
        ):
            return True
    return False


def choose_upstreams(
    candidates: Iterable[Address], own: Iterable[Address]
) -> Upstreams:
    """
    The C{candidates} we may forward to, given that we listen on C{own}
    (host, port) addresses. A listener on C{0.0.0.0} or C{::} counts as
    every loopback address on its port; another address of this machine on
    that port cannot be told from here and is kept.
    """
    listening = list(own)
    servers: list[Address] = []
    skipped: list[tuple[Address, str]] = []
    for host, port in candidates:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            skipped.append(((host, port), "is not an IP address"))
            continue
        if address in STUBS:
            skipped.append(
                (
                    (host, port),
                    "is systemd-resolved's stub, which would send our names back to us",
                )
            )
        elif _is_ours(address, port, listening):
            skipped.append(((host, port), "is this DNS server itself"))
        elif (host, port) in servers:
            continue
        elif len(servers) >= MAX_UPSTREAMS:
            skipped.append(((host, port), f"is beyond the first {MAX_UPSTREAMS}"))
        else:
            servers.append((host, port))
    return Upstreams(tuple(servers), tuple(skipped))


def upstreams_from_resolv_conf(text: str, own: Iterable[Address]) -> Upstreams:
    """
    The upstreams named by the C{nameserver} lines of a C{resolv.conf}'s
    C{text}, chosen by L{choose_upstreams}.
    """
    candidates = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            candidates.append((fields[1], DNS_PORT))
    return choose_upstreams(candidates, own)
