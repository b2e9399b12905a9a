# -*- test-case-name: ngrokd.test.test_plan -*-
"""
Deciding where each bound endpoint listens: a pure function of the endpoints,
the network settings and the address/port allocations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address

from attrs import frozen

from ngrokd.endpoints import BoundEndpoint, EndpointTarget
from ngrokd.listeners import ListenSpec

VIRTUAL = "virtual"


def listen_mode(host: str, listen_interface: str, overrides: Mapping[str, str]) -> str:
    """
    C{virtual}, C{0.0.0.0} or an address: the host's override, or the default.
    """
    return overrides.get(host, listen_interface)


@frozen
class Plan:
    """
    Listeners by normalised endpoint URL, and the endpoints that could not get
    one (with the reason).
    """

    specs: Mapping[str, ListenSpec]
    failures: Mapping[str, str]


def targets(endpoints: Iterable[BoundEndpoint]) -> dict[str, EndpointTarget]:
    """
    One target per normalised URL: endpoints that share one are one listener.
    """
    return {endpoint.target.url: endpoint.target for endpoint in endpoints}


def plan(
    endpoints: Iterable[BoundEndpoint],
    listen_interface: str,
    overrides: Mapping[str, str],
    ips: Mapping[str, IPv4Address | IPv6Address],
    network_ports: Mapping[tuple[str, int], int],
) -> Plan:
    """
    In virtual mode an endpoint listens on its hostname's own address and its
    URL's port, and clients already use its name; otherwise on the mode's
    address and its network port, where HTTP requests need their C{Host}
    rewritten to the endpoint's name.
    """
    specs: dict[str, ListenSpec] = {}
    failures: dict[str, str] = {}
    served_by: dict[tuple[str, int], str] = {}
    for url, target in sorted(targets(endpoints).items()):
        mode = listen_mode(target.host, listen_interface, overrides)
        if mode == VIRTUAL:
            ip = ips.get(target.host)
            if ip is None:
                failures[url] = f"no address could be allocated for {target.host}"
                continue
            specs[url] = ListenSpec(str(ip), target.port, target, None)
        else:
            port = network_ports.get((target.host, target.port))
            if port is None:
                failures[url] = f"no network port could be allocated for {url}"
                continue
            rewrite = target.http_host if target.is_http else None
            specs[url] = ListenSpec(mode, port, target, rewrite)
        # Two schemes on one host and port (http://a.ns:443 and tls://a.ns)
        # cannot share a socket: the first in URL order keeps it.
        bind = specs[url].bind
        if bind in served_by:
            del specs[url]
            failures[url] = (
                f"{target.host}:{target.port} is already served by {served_by[bind]}"
            )
        else:
            served_by[bind] = url
    return Plan(specs, failures)
