# -*- test-case-name: ngrokd.test.test_dns_names -*-
"""
The names the DNS server answers: a value the daemon builds anew at each
reconcile and hands to the server whole (L{ngrokd.dns.server.DNSServer.set_table}),
so that a query never sees half of one table and half of the next.

A name is exact (C{web.prod}) or a wildcard (C{*.apps.prod}: every name
below C{apps.prod}, at any depth, answers with its addresses). An exact name
beats a wildcard, and a deeper wildcard beats a shallower one. The names
above a served name (C{apps.prod} for C{*.apps.prod}, C{team.corp} for
C{web.team.corp}) exist without addresses: a resolver that took "no such
name" for them would take it for everything below them (RFC 8020).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from attrs import frozen

from ngrokd.dns.zones import enclosing, normalise, parents, routing_domains

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_EMPTY: Mapping[str, tuple[IPAddress, ...]] = MappingProxyType({})


@frozen
class NameTable:
    """
    What to answer: every field is immutable, so a table can be shared with
    the server while the next one is built.

    @ivar exact: each exact name, normalised, with its addresses.
    @ivar wildcards: for each C{*.S}, S with its addresses.
    @ivar zones: the zones served alone (L{ngrokd.dns.zones.routing_domains}).
    @ivar interior: the names that exist only because names are below them.
    @ivar pointers: each of our addresses' reverse name (C{2.0.107.10.in-addr.arpa})
        with the names it has.
    """

    exact: Mapping[str, tuple[IPAddress, ...]] = _EMPTY
    wildcards: Mapping[str, tuple[IPAddress, ...]] = _EMPTY
    zones: frozenset[str] = frozenset()
    interior: frozenset[str] = frozenset()
    pointers: Mapping[str, tuple[str, ...]] = MappingProxyType({})

    def addresses(self, name: str) -> tuple[IPAddress, ...] | None:
        """
        The addresses of C{name} (normalised), or L{None} when it has none
        of ours.
        """
        found = self.exact.get(name)
        if found is not None:
            return found
        if self.wildcards:
            for parent in parents(name):
                found = self.wildcards.get(parent)
                if found is not None:
                    return found
        return None

    def zone_of(self, name: str) -> str | None:
        """
        The zone of ours that C{name} is in, or L{None}.
        """
        return enclosing(name, self.zones)

    def exists(self, name: str) -> bool:
        """
        Whether C{name}, which has no address of ours, is there all the same:
        a zone's apex, or a name above one of ours.
        """
        return name in self.interior or name in self.zones


#: The table before the first reconcile: every name is forwarded.
EMPTY_TABLE = NameTable()


def _name(name: str) -> tuple[str, bool]:
    """
    C{name} normalised, without its C{*.}, and whether it was a wildcard.

    @raise ValueError: C{name} is empty or has a C{*} anywhere else.
    """
    normal = normalise(name)
    wildcard = normal.startswith("*.")
    base = normal.removeprefix("*.")
    if not base or "*" in base or "" in base.split("."):
        raise ValueError(f"{name!r} is not a name the DNS server can serve")
    return base, wildcard


def build_table(entries: Mapping[str, Iterable[IPAddress]]) -> NameTable:
    """
    The table for C{entries}: each name (exact, or C{*.S}) with its
    addresses, IPv4 and IPv6. Its zones are the names' routing domains.

    @raise ValueError: a name cannot be served (see L{_name}).
    """
    exact: dict[str, tuple[IPAddress, ...]] = {}
    wildcards: dict[str, tuple[IPAddress, ...]] = {}
    pointers: dict[str, list[str]] = {}
    for name, addresses in entries.items():
        base, wildcard = _name(name)
        ordered = tuple(sorted(set(addresses), key=lambda a: (a.version, a)))
        (wildcards if wildcard else exact)[base] = ordered
        for address in ordered:
            pointers.setdefault(address.reverse_pointer, []).append(base)
    zones = frozenset(routing_domains(entries))
    interior = {
        parent
        for base in exact.keys() | wildcards.keys()
        for parent in parents(base)
        if enclosing(parent, zones) is not None
    }
    interior |= wildcards.keys() - exact.keys()
    return NameTable(
        exact=MappingProxyType(exact),
        wildcards=MappingProxyType(wildcards),
        zones=zones,
        interior=frozenset(interior),
        pointers=MappingProxyType(
            {ptr: tuple(sorted(set(names))) for ptr, names in pointers.items()}
        ),
    )
