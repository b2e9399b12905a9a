# -*- test-case-name: ngrokd.test.test_allocation -*-
"""
Which local address each hostname gets, and which network port each
endpoint: the decision, a pure function.

Clients reach a bound endpoint in virtual mode by its hostname, so every
hostname needs an address of its own: two hostnames on one address could not
both listen on port 80, and removing one must not take the address from the
other (fault 13 of the original). In network mode endpoints share an address
and are told apart by port, so every C{(hostname, port)} needs a port of its
own (fault 14). Both must stay put across polls and restarts, because
clients, DNS caches and firewall rules remember them.

An address or port that an endpoint gives up is held back from other
endpoints for a while (C{net.reuse_after}), unless nothing else is left: a
client still using it must not silently reach another service. The same
endpoint coming back within that time gets it again. With C{net.subnet6},
every such hostname also gets an IPv6 address, kept the same way.

L{allocate} is a pure function of the previous allocations, of what is
wanted now, and of the time; L{ngrokd.host.allocation} keeps its result in
the state directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Any, TypeVar

from attrs import field, frozen

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
#: A bound endpoint as the allocator sees it: its hostname and URL port.
EndpointKey = tuple[str, int]
MAX_PORT = 65535


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@frozen
class Allocations:
    """
    What is allocated: an address per hostname and a network port per
    endpoint.

    @ivar legacy_network_ports: ports read from the original's older
        C{network_ports.json}, which was keyed by hostname alone. The next
        L{allocate} gives each to its hostname's lowest wanted endpoint port
        and returns none of them.
    """

    ips: Mapping[str, IPAddress] = field(factory=dict, converter=_frozen)
    network_ports: Mapping[EndpointKey, int] = field(factory=dict, converter=_frozen)
    legacy_network_ports: Mapping[str, int] = field(factory=dict, converter=_frozen)
    #: Addresses given up, held back from other hostnames: by the hostname
    #: that had it, the address and when (POSIX time) it was given up.
    released_ips: Mapping[str, tuple[IPAddress, float]] = field(
        factory=dict, converter=_frozen
    )
    #: Network ports given up, likewise, by endpoint.
    released_ports: Mapping[EndpointKey, tuple[int, float]] = field(
        factory=dict, converter=_frozen
    )
    #: The IPv6 address of each hostname (from C{net.subnet6}), and those
    #: given up, as C{ips} and C{released_ips}.
    ips6: Mapping[str, IPAddress] = field(factory=dict, converter=_frozen)
    released_ips6: Mapping[str, tuple[IPAddress, float]] = field(
        factory=dict, converter=_frozen
    )


@frozen
class AllocationResult:
    """
    The outcome of L{allocate}.

    @ivar errors: why a hostname got no address (keyed by hostname) or an
        endpoint no network port (keyed by C{(hostname, port)}); everything
        else was allocated.
    """

    allocations: Allocations
    errors: Mapping[str | EndpointKey, str] = field(factory=dict, converter=_frozen)


def usable_addresses(subnet: IPNetwork) -> range:
    """
    The integer values of the addresses that can be handed out in C{subnet}:
    from its second host address on (the first, C{.1}, is left to a gateway as
    in the original), without IPv4's broadcast address.
    """
    last = int(subnet.broadcast_address)
    if subnet.version == 4:
        last -= 1
    return range(int(subnet.network_address) + 2, last + 1)


def _count(usable: range) -> int:
    # len() of a range fails beyond sys.maxsize (an IPv6 /64 is).
    return usable.stop - usable.start


def is_usable(ip: IPAddress, subnet: IPNetwork) -> bool:
    """
    Whether C{ip} is an address L{allocate} could give out in C{subnet}.
    """
    return ip.version == subnet.version and int(ip) in usable_addresses(subnet)


def allocate(
    previous: Allocations,
    wanted_ips: Iterable[str],
    wanted_ports: Iterable[EndpointKey],
    subnet: IPNetwork,
    start_port: int,
    now: float = 0.0,
    hold: float = 0.0,
    subnet6: IPNetwork | None = None,
) -> AllocationResult:
    """
    Allocate an address to every hostname of C{wanted_ips} and a network port
    to every endpoint of C{wanted_ports}, keeping what C{previous} gave them.

    A hostname keeps its previous address if that address is usable in
    C{subnet}; an endpoint keeps its previous port if it lies between
    C{start_port} and 65535 (so changing either setting moves what no longer
    fits it). What is no longer wanted is released, and held back for
    C{hold} seconds from C{now}: a hostname or endpoint that comes back
    within that time gets its value again, and newcomers get the lowest
    value from C{.2} of C{subnet} (from C{start_port}) that is neither in
    use nor held; only when none is left do they get a held one. Should
    C{previous} give one address (or port) to several, the first in sorted
    order keeps it. So no two hostnames ever share an address, no two
    endpoints a port, and the result depends only on the sets wanted (and
    the time), not on their order.

    When the subnet or the port range is full, the hostnames or endpoints
    left over are reported in L{AllocationResult.errors}; all others are
    still allocated.

    With C{subnet6}, every hostname of C{wanted_ips} also gets an IPv6
    address of it, by the same rules; one left without is not an error (it
    is served over IPv4), and without C{subnet6} none has one.
    """
    errors: dict[str | EndpointKey, str] = {}
    wanted = set(wanted_ips)
    ips, released_ips = _addresses(
        previous.ips, previous.released_ips, wanted, subnet, (now, hold), errors
    )
    ips6: dict[str, IPAddress] = {}
    released_ips6: dict[str, tuple[IPAddress, float]] = {}
    if subnet6 is not None:
        ips6, released_ips6 = _addresses(
            previous.ips6, previous.released_ips6, wanted, subnet6, (now, hold), {}
        )
    ports, released_ports = _allocate(
        previous.network_ports,
        previous.legacy_network_ports,
        previous.released_ports,
        set(wanted_ports),
        range(start_port, MAX_PORT + 1),
        (now, hold),
        errors,
        lambda key: (
            f"no network port left for {key[0]}:{key[1]}: all ports from "
            f"{start_port} to {MAX_PORT} are in use"
        ),
    )
    return AllocationResult(
        Allocations(
            ips,
            ports,
            released_ips=released_ips,
            released_ports=released_ports,
            ips6=ips6,
            released_ips6=released_ips6,
        ),
        errors,
    )


def _addresses(
    previous: Mapping[str, IPAddress],
    released: Mapping[str, tuple[IPAddress, float]],
    wanted: set[str],
    subnet: IPNetwork,
    clock: tuple[float, float],
    errors: dict[str | EndpointKey, str],
) -> tuple[dict[str, IPAddress], dict[str, tuple[IPAddress, float]]]:
    """
    The addresses of L{allocate} in C{subnet}, and those held back.
    """
    make = IPv4Address if subnet.version == 4 else IPv6Address
    usable = usable_addresses(subnet)
    values, held = _allocate(
        {host: int(ip) for host, ip in previous.items() if is_usable(ip, subnet)},
        {},
        {
            host: (int(ip), when)
            for host, (ip, when) in released.items()
            if is_usable(ip, subnet)
        },
        wanted,
        usable,
        clock,
        errors,
        lambda host: (
            f"no address left for {host}: all {_count(usable)}"
            f" usable addresses of {subnet} are in use"
        ),
    )
    return (
        {host: make(value) for host, value in values.items()},
        {host: (make(value), when) for host, (value, when) in held.items()},
    )


#: What gets a value: a hostname (an address) or an endpoint (a port).
K = TypeVar("K", str, tuple[str, int])


def _allocate(
    previous: Mapping[K, int],
    legacy: Mapping[str, int],
    released: Mapping[K, tuple[int, float]],
    wanted: set[K],
    usable: range,
    clock: tuple[float, float],
    errors: dict[str | EndpointKey, str],
    no_value: Callable[[K], str],
) -> tuple[dict[K, int], dict[K, tuple[int, float]]]:
    """
    The values of L{allocate}, for addresses or ports (as integers), and
    what is held back after it; why those left without a value have none
    goes to C{errors}.

    @param legacy: the original's ports by hostname alone, each given to its
        hostname's lowest wanted endpoint port.
    @param clock: the time now, and how long a released value is held.
    """
    now, hold = clock
    values: dict[K, int] = {}
    used: set[int] = set()

    def keep(key: K, value: int) -> None:
        if value in usable and value not in used:
            values[key] = value
            used.add(value)

    for key in sorted(wanted & previous.keys()):
        keep(key, previous[key])
    if legacy:
        lowest: dict[str, K] = {}
        for key in sorted(wanted):
            lowest.setdefault(key[0], key)
        for hostname in sorted(legacy.keys() & lowest.keys()):
            if lowest[hostname] not in values:
                keep(lowest[hostname], legacy[hostname])
    held = {
        key: (value, when)
        for key, (value, when) in released.items()
        if now - when < hold and key not in values
    }
    for key in sorted(wanted & held.keys()):
        if key not in values:
            keep(key, held[key][0])
    if hold > 0:
        for key in previous.keys() - wanted:
            held.setdefault(key, (previous[key], now))
    held = {key: entry for key, entry in held.items() if key not in values}
    newcomers = wanted - values.keys()
    handed = _hand_out(newcomers, usable, used | {v for v, _ in held.values()})
    used.update(handed.values())
    handed.update(_hand_out(newcomers - handed.keys(), usable, used))
    values.update(handed)
    for key in sorted(wanted - values.keys()):
        errors[key] = no_value(key)
    taken = set(values.values())
    return values, {k: entry for k, entry in held.items() if entry[0] not in taken}


def _hand_out(newcomers: set[K], usable: range, used: set[int]) -> dict[K, int]:
    """
    Give each of C{newcomers}, in sorted order, the lowest value of
    C{usable} not in C{used}; those left when C{usable} runs out get none.
    """
    handed: dict[K, int] = {}
    taken = set(used)
    candidate = usable.start
    for key in sorted(newcomers):
        while candidate in taken:
            candidate += 1
        if candidate not in usable:
            break
        handed[key] = candidate
        taken.add(candidate)
    return handed
