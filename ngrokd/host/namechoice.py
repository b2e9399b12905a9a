# -*- test-case-name: ngrokd.test.test_nameservice -*-
"""
How endpoint names reach programs, decided: which way (systemd-resolved,
C{/etc/resolver}, the hosts file), where the DNS server listens, which
addresses it needs on ngrokd's link, what its table and the hosts file
hold. Pure functions of the settings and of what was found, so that
L{ngrokd.host.nameservice} (which does the I/O) and C{ngrokctl diagnose}
decide alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, ip_address
from typing import TypeVar

from attrs import frozen

from ngrokd.config import DnsConfig, NetConfig
from ngrokd.dns.table import NameTable, build_table
from ngrokd.dns.upstreams import Address
from ngrokd.endpoints import is_wildcard, join_host_port
from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.plan import NameAddresses, uses_virtual

#: The ways names reach the system (C{dns.mode}, but for C{auto}).
RESOLVED = "resolved"
RESOLVER_FILES = "resolver-files"
HOSTS = "hosts"
OFF = "off"
#: What each mode is called in status and the log.
VIA = {
    RESOLVED: "systemd-resolved",
    RESOLVER_FILES: "/etc/resolver",
    HOSTS: "the hosts file",
    OFF: "the hosts file",
}
#: The modes that register the DNS server with the system.
VIA_DNS = frozenset({RESOLVED, RESOLVER_FILES})
#: The port systemd-resolved sends a link's queries to.
DNS_PORT = 53
#: macOS's lo0 has it: never added to the link, nor removed.
_LOOPBACK = IPv4Address("127.0.0.1")

_T = TypeVar("_T")


class Fallback(Exception):
    """
    The DNS server cannot serve the system's names now; the message says
    why: the names go to the hosts file meanwhile.
    """


def choose_mode(configured: str, platform: str, resolved_runs: bool) -> str:
    """
    How names reach the system for C{dns.mode} C{configured}: C{auto} is
    systemd-resolved when it runs, C{/etc/resolver} on macOS, else the
    hosts file.
    """
    if configured != "auto":
        return configured
    if platform == "darwin":
        return RESOLVER_FILES
    if platform.startswith("linux") and resolved_runs:
        return RESOLVED
    return HOSTS


def server_listen(dns: DnsConfig, net: NetConfig) -> Address | None:
    """
    Where the DNS server listens: C{dns.listen}; by default, in virtual
    mode, the first host of C{net.subnet} (the endpoints' addresses start
    at the second), port 53; none in network mode or with C{dns.mode: off}.
    """
    if dns.mode == OFF:
        return None
    if dns.listen:
        return parse_address(dns.listen)
    if uses_virtual(net.listen_interface, net.overrides):
        return str(net.subnet.network_address + 1), DNS_PORT
    return None


def server_listen6(
    dns: DnsConfig, net: NetConfig, subnet6: IPNetwork | None
) -> Address | None:
    """
    Where the DNS server listens over IPv6 too: by default, in virtual
    mode, the first host of C{subnet6} (the IPv6 block; the names'
    addresses start at its second), port 53; none when C{dns.listen} names
    the one address, or where L{server_listen} gives none.
    """
    if subnet6 is None or dns.listen or server_listen(dns, net) is None:
        return None
    return str(subnet6.network_address + 1), DNS_PORT


def own_address(listen: Address | None, net: NetConfig) -> IPAddress | None:
    """
    The address the daemon must put on its link for the server: the one it
    listens on when that is in C{net.subnet} (never C{127.0.0.1}, which
    loopback always has).
    """
    if listen is None:
        return None
    address = ip_address(listen[0])
    if address in net.subnet and address != _LOOPBACK:
        return address
    return None


def own_addresses(
    dns: DnsConfig, net: NetConfig, subnet6: IPNetwork | None
) -> frozenset[IPAddress]:
    """
    The addresses the daemon must put on its link for the server: its IPv4
    one (L{own_address}) and, with an IPv6 block C{subnet6}, its IPv6 one.
    """
    own = own_address(server_listen(dns, net), net)
    listen6 = server_listen6(dns, net, subnet6)
    return frozenset(
        [
            *([] if own is None else [own]),
            *([] if listen6 is None else [ip_address(listen6[0])]),
        ]
    )


def hosts_names(names: Mapping[str, _T], dns_serves: bool) -> dict[str, _T]:
    """
    What the hosts file must hold of C{names}: nothing when DNS serves them
    to the system, otherwise every name but the wildcards (a hosts line
    names one host).
    """
    if dns_serves:
        return {}
    return {name: value for name, value in names.items() if not is_wildcard(name)}


def names_table(
    names: Mapping[str, NameAddresses], probe_name: str | None, server: IPAddress
) -> NameTable:
    """
    The DNS server's table: every name (wildcards too) with its IPv4 and
    IPv6 addresses, and C{probe_name}, when given, with the server's own.
    """
    entries: dict[str, tuple[IPAddress, ...]] = {
        name: (*v4, *v6) for name, (v4, v6) in names.items()
    }
    if probe_name is not None:
        entries[probe_name] = (server,)
    return build_table(entries)


def serves_by_dns(via: str) -> bool:
    """
    Whether L{NamesStatus.via} (status's C{names_via}) says that the system
    resolves our names through the DNS server, not the hosts file.
    """
    return not via.startswith(VIA[HOSTS])


def probe_name(token: str, domains: tuple[str, ...]) -> str | None:
    """
    The name the check looks up: under our first routing domain, so that
    the system sends it to us, and known to no one else.
    """
    return f"ngrokd-probe-{token}.{domains[0]}" if domains else None


@frozen
class NamesStatus:
    """
    How names reach programs now, for status.

    @ivar via: what resolves them for the system (C{systemd-resolved}, the
        hosts file...), and the DNS server's address when it runs.
    @ivar fallback: why the hosts file is used instead of the DNS server
        (C{""}: it is not, or DNS was not asked for).
    @ivar strict: C{dns.mode} asked for DNS by name (not C{auto}): a
        fallback is then not what was configured.
    @ivar dns_serves: the system resolves our names through the server.
    """

    via: str
    fallback: str = ""
    strict: bool = False
    dns_serves: bool = False


def parse_address(text: str) -> Address:
    """
    C{address:port} (C{[ipv6]:port}) as a (host, port) pair.
    """
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def names_status(
    dns: DnsConfig,
    net: NetConfig,
    mode: str | None,
    dns_serves: bool,
    chosen_because: str,
    server_addresses: Sequence[Address],
    fallback: str,
) -> NamesStatus:
    """
    How names reach programs: in C{mode} (C{None}: not chosen yet),
    whether the system resolves them through the DNS server (on
    C{server_addresses} while it runs), why C{auto} chose what it chose, and
    why the hosts file is used instead.
    """
    listen = server_listen(dns, net)
    mode = mode or dns.mode
    via = VIA[mode] if dns_serves else VIA[HOSTS]
    if chosen_because:
        via += f" ({chosen_because})"
    if server_addresses:
        on = ", ".join(join_host_port(*a) for a in server_addresses)
        via += f"; DNS server on {on}"
    elif listen is not None and mode != OFF:
        via += "; DNS server not started yet"
    return NamesStatus(
        via,
        fallback,
        dns.mode in (RESOLVED, RESOLVER_FILES),
        dns_serves,
    )


def unnamed(hosts: Iterable[str], status: NamesStatus) -> dict[str, str]:
    """
    Why each wildcard of C{hosts} cannot be reached by name, when names
    reach programs as C{status} says: a hosts file cannot hold a wildcard.
    """
    if status.dns_serves:
        return {}
    why = status.fallback or f"names reach this system through {status.via}"
    return {
        host: (
            f"no name under {host.removeprefix('*.')} reaches it: a hosts"
            f" file cannot hold a wildcard, and {why}"
        )
        for host in hosts
        if is_wildcard(host)
    }
