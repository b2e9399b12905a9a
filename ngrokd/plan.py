# -*- test-case-name: ngrokd.test.test_plan -*-
"""
Deciding where each bound endpoint listens: a pure function of the endpoints,
the network settings and the address/port allocations.

Each endpoint's hostname has a listen mode: C{virtual} (its own address, its
own port: clients use its name), C{0.0.0.0} (every address, a network port)
or one address of this machine (a network port). In network mode the name
does not lead to the listener: the port differs from the URL's, so the name
is left out of the hosts file (the original pointed it at an address where
nothing listened on the URL's port, fault 29), and every planned listener
carries the address a local client should use
(L{ListenSpec.client_address}), for status output and the docs.

A virtual-mode hostname with an IPv6 address too listens there as well: a
second spec per endpoint (L{Plan.specs6}), on the same port, sharing the
endpoint's counts. It is a bonus: without it (no IPv6 here, a bind that
failed) the endpoint is served over IPv4 and does not fail.

A virtual-mode hostname is a claim on the name, on this whole machine: one
that L{ngrokd.names.refusal} refuses gets no address and no listener, and
fails with that reason. A network-mode one claims no name, and so is not
refused.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Address, IPv6Address, ip_address

import attrs
from attrs import field, frozen

from ngrokd.endpoints import BoundEndpoint, EndpointTarget, join_host_port
from ngrokd.names import NO_FACTS, NameRules, refusal

VIRTUAL = "virtual"

#: A name's addresses: IPv4, then IPv6.
NameAddresses = tuple[tuple[IPv4Address, ...], tuple[IPv6Address, ...]]


@frozen
class ListenSpec:
    """
    Where one endpoint is served locally, and how.

    @ivar virtual: whether C{address} is the hostname's own virtual-mode
        address (else it is the configured network-mode address).
    @ivar client_address: what a program on this machine connects to.
    """

    address: str
    port: int
    target: EndpointTarget
    rewrite_host: str | None = None
    virtual: bool = False
    client_address: str = ""

    @property
    def bind(self) -> tuple[str, int]:
        return (self.address, self.port)


def listen_mode(host: str, listen_interface: str, overrides: Mapping[str, str]) -> str:
    """
    C{virtual}, C{0.0.0.0} or an address: the host's override, or the default.
    """
    return overrides.get(host, listen_interface)


def uses_virtual(listen_interface: str, overrides: Mapping[str, str]) -> bool:
    """
    Whether any hostname can be in virtual mode with these settings.
    """
    return listen_interface == VIRTUAL or VIRTUAL in overrides.values()


def client_address(mode: str, port: int) -> str:
    """
    Where a program on this machine reaches a network-mode listener bound to
    C{mode}: a wildcard is reached through loopback.
    """
    return join_host_port(_client_host(mode), port)


@functools.lru_cache(maxsize=256)
def _client_host(mode: str) -> str:
    # Cached: a plan asks once per endpoint, for one or a few modes.
    address = ip_address(mode)
    if address.is_unspecified:
        address = IPv4Address("127.0.0.1") if address.version == 4 else IPv6Address(1)
    return str(address)


@frozen
class Plan:
    """
    Listeners by normalised endpoint URL, and the endpoints that could not get
    one (with the reason).

    @ivar refused: the failures that are decisions, not faults (two
        endpoints that need one socket; a name that is not ngrokd's to
        claim, L{ngrokd.names}): listed, but they do not make the daemon
        unready.
    """

    specs: Mapping[str, ListenSpec]
    failures: Mapping[str, str]
    refused: frozenset[str] = frozenset()
    #: The IPv6 listener of each virtual-mode endpoint of C{specs} whose
    #: hostname has an IPv6 address, by URL.
    specs6: Mapping[str, ListenSpec] = field(factory=dict)

    def name_addresses(self) -> dict[str, NameAddresses]:
        """
        The addresses of each hostname with a virtual-mode listener, IPv4
        and IPv6: what the names (hosts file, DNS) should say.
        """
        names: dict[str, tuple[set[IPv4Address], set[IPv6Address]]] = {}
        for specs in (self.specs, self.specs6):
            for spec in specs.values():
                if spec.virtual:
                    ip = ip_address(spec.address)
                    v4, v6 = names.setdefault(spec.target.host, (set(), set()))
                    if isinstance(ip, IPv4Address):
                        v4.add(ip)
                    else:
                        v6.add(ip)
        return {
            name: (tuple(sorted(v4)), tuple(sorted(v6)))
            for name, (v4, v6) in names.items()
        }

    def virtual_names(self) -> dict[str, tuple[IPv4Address | IPv6Address, ...]]:
        """
        Hostname to its addresses (IPv4 first), for the hostnames with a
        virtual-mode listener: what the hosts file should say.
        """
        return {name: v4 + v6 for name, (v4, v6) in self.name_addresses().items()}

    def without_addresses(self, missing: Mapping[str, str]) -> Plan:
        """
        This plan with the virtual-mode listeners on the addresses of
        C{missing} (address to the reason it could not be set up) moved to the
        failures; an IPv6 listener whose address is missing is only left
        out, the endpoint being served over IPv4.
        """
        specs = dict(self.specs)
        failures = dict(self.failures)
        for url, spec in self.specs.items():
            if spec.virtual and spec.address in missing:
                del specs[url]
                failures[url] = (
                    f"address {spec.address} for {spec.target.host} could not be"
                    f" set up: {missing[spec.address]}"
                )
        specs6 = {
            url: spec
            for url, spec in self.specs6.items()
            if url in specs and spec.address not in missing
        }
        return Plan(specs, dict(sorted(failures.items())), self.refused, specs6)


@frozen
class ListenerChanges:
    """
    What makes the running listeners match a plan, by endpoint URL.

    @ivar stop: listeners no longer planned.
    @ivar start: planned endpoints with no listener yet.
    @ivar rebind: listeners whose address or port changed.
    @ivar update: listeners on the same address and port whose spec changed
        otherwise (target, C{Host} rewrite, client address): their socket
        stays.
    @ivar retry: listeners on the same address and port that are not
        listening (their last bind failed).
    """

    stop: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    rebind: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    retry: tuple[str, ...] = ()


def listener_changes(
    current: Mapping[str, ListenSpec],
    listening: AbstractSet[str],
    wanted: Mapping[str, ListenSpec],
) -> ListenerChanges:
    """
    Compare the running listeners (C{current}, of which C{listening} are
    bound) with the C{wanted} specs.
    """
    stop, start, rebind, update, retry = [], [], [], [], []
    for key in current:
        if key not in wanted:
            stop.append(key)
    for key, spec in wanted.items():
        old = current.get(key)
        if old is None:
            start.append(key)
        elif old.bind != spec.bind:
            rebind.append(key)
        else:
            if old != spec:
                update.append(key)
            if key not in listening:
                retry.append(key)
    return ListenerChanges(
        tuple(stop), tuple(start), tuple(rebind), tuple(update), tuple(retry)
    )


def wanted_allocations(
    endpoints: Iterable[BoundEndpoint],
    listen_interface: str,
    overrides: Mapping[str, str],
    names: NameRules = NO_FACTS,
) -> tuple[set[str], set[tuple[str, int]]]:
    """
    What the endpoints need allocated: an address for each hostname in
    virtual mode that C{names} do not refuse, a network port for each other
    host and port.
    """
    hosts: set[str] = set()
    ports: set[tuple[str, int]] = set()
    for target in targets(endpoints).values():
        if listen_mode(target.host, listen_interface, overrides) == VIRTUAL:
            if refusal(target.host, names) is None:
                hosts.add(target.host)
        else:
            ports.add((target.host, target.port))
    return hosts, ports


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
    allocation_errors: Mapping[str | tuple[str, int], str] | None = None,
    names: NameRules = NO_FACTS,
    ips6: Mapping[str, IPv4Address | IPv6Address] | None = None,
) -> Plan:
    """
    In virtual mode an endpoint listens on its hostname's own address and its
    URL's port, and clients already use its name; otherwise on the mode's
    address and its network port, where HTTP requests need their C{Host}
    rewritten to the endpoint's name.

    @param allocation_errors: why a hostname got no address or an endpoint
        no port (L{ngrokd.host.allocation.AllocationResult.errors}), reported as
        its failure.
    @param names: what decides whether a virtual-mode hostname may be
        claimed; a refused one fails with the reason.
    @param ips6: the IPv6 address of virtual-mode hostnames that have one:
        their endpoints listen there too, on the same port.
    """
    errors = allocation_errors or {}
    specs: dict[str, ListenSpec] = {}
    specs6: dict[str, ListenSpec] = {}
    ips6 = ips6 or {}
    failures: dict[str, str] = {}
    served_by: dict[tuple[str, int], str] = {}
    refused: set[str] = set()
    for url, target in sorted(targets(endpoints).items()):
        mode = listen_mode(target.host, listen_interface, overrides)
        if mode == VIRTUAL:
            reason = refusal(target.host, names)
            if reason is not None:
                failures[url] = reason
                refused.add(url)
                continue
            ip = ips.get(target.host)
            if ip is None:
                failures[url] = errors.get(
                    target.host, f"no address could be allocated for {target.host}"
                )
                continue
            specs[url] = ListenSpec(
                str(ip),
                target.port,
                target,
                None,
                virtual=True,
                client_address=join_host_port(target.host, target.port),
            )
        else:
            key = (target.host, target.port)
            port = network_ports.get(key)
            if port is None:
                failures[url] = errors.get(
                    key, f"no network port could be allocated for {url}"
                )
                continue
            # A wildcard's clients say which name under it they meant.
            rewrite = (
                target.http_host if target.is_http and not target.is_wildcard else None
            )
            specs[url] = ListenSpec(
                mode, port, target, rewrite, client_address=client_address(mode, port)
            )
        # Two schemes on one host and port (http://a.ns:443 and tls://a.ns)
        # cannot share a socket: the first in URL order keeps it.
        bind = specs[url].bind
        if bind in served_by:
            del specs[url]
            failures[url] = (
                f"{target.host}:{target.port} is already served by {served_by[bind]}"
            )
            refused.add(url)
        else:
            served_by[bind] = url
            ip6 = ips6.get(target.host) if specs[url].virtual else None
            if ip6 is not None:
                specs6[url] = attrs.evolve(specs[url], address=str(ip6))
    return Plan(specs, failures, frozenset(refused), specs6)
