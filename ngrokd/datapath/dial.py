# -*- test-case-name: ngrokd.test.test_dial -*-
"""
TCP client endpoints that resolve a name only when there is one.

L{HostnameEndpoint} resolves even an address, in a thread of the reactor's
pool, at every connection: under a burst of thousands that queue of lookups
is a cost of its own. An address is dialled directly.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint


def tcp_client_endpoint(
    reactor: Any, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    Connect to C{host} (a name or an IPv4 or IPv6 address) and C{port},
    giving up after C{timeout} seconds.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)
