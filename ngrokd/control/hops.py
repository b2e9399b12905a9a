# -*- test-case-name: ngrokd.test.test_hops -*-
"""
The hops of C{ngrokctl diagnose}, each judged by a pure function of what
was read (a L{ngrokd.control.verdict.Check} each).

L{ngrokd.control.diagnose} reads and connects, then hands what it found to
these; they read nothing themselves, so each is tested with what a broken
machine would give it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import ip_address
from typing import Any

from cryptography import x509

from ngrokd.control.verdict import FAIL, PASS, Check
from ngrokd.endpoints import is_wildcard
from ngrokd.host.allocation import IPAddress
from ngrokd.host.hostsection import render
from ngrokd.host.resolved import DNS_SCOPE, LinkState, ResolvedError
from ngrokd.host.resolverfiles import resolver_file
from ngrokd.plan import VIRTUAL

#: systemd-resolved's stub, which a C{resolv.conf} it manages names.
RESOLVED_STUB = ip_address("127.0.0.53")
#: The first label of the name looked up for a wildcard (C{*.apps.prod}).
SAMPLE_LABEL = "ngrokd-diagnose"
#: What to do when resolved does not route our names as the daemon said.
REGISTRATION_HINT = (
    "ngrokd registers its link at each poll: see the names line of ngrokctl"
    " status and the daemon's log"
)


def certificate_check(cert_pem: bytes, path: str, now: datetime.datetime) -> Check:
    """
    Whether this machine's certificate is valid now, and until when.
    """
    name = "certificate valid"
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        return Check(name, FAIL, f"{path}: {e}", "remove it to register afresh")
    expires = certificate.not_valid_after_utc
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if now < certificate.not_valid_before_utc:
        return Check(name, FAIL, f"{path}: not valid before", "check the clock")
    if now >= expires:
        return Check(
            name,
            FAIL,
            f"{path}: expired {when}",
            "the daemon renews it while the API works: see the API check",
        )
    days = (expires - now).days
    return Check(name, PASS, f"{path}: expires {when} (in {days} days)")


def virtual_names(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[IPAddress, ...]]:
    """
    The names the daemon's virtual-mode endpoints want (wildcards too),
    with their addresses, IPv4 first.
    """
    found: dict[str, set[IPAddress]] = {}
    for row in rows:
        if row.get("mode") == VIRTUAL and row.get("listen_address"):
            listed = row.get("addresses") or [
                row["listen_address"].rpartition(":")[0].strip("[]")
            ]
            host = row["client_address"].rpartition(":")[0].strip("[]")
            found.setdefault(host, set()).update(ip_address(a) for a in listed)
    return {
        host: tuple(sorted(addresses, key=lambda ip: (ip.version, int(ip))))
        for host, addresses in found.items()
    }


def lookup_name(host: str) -> str:
    """
    The name looked up for C{host}: a name under it for a wildcard.
    """
    return f"{SAMPLE_LABEL}.{host[2:]}" if is_wildcard(host) else host


def hosts_check(
    path: str,
    text: str,
    names: Mapping[str, tuple[IPAddress, ...]],
    instance: str = "",
) -> Check:
    """
    Whether the hosts file's section of ngrokd instance C{instance} holds
    exactly C{names} (none when DNS serves them).
    """
    name = "hosts section matches"
    if render(text, names, instance) == text:
        return Check(name, PASS, f"{path}: {len(names)} names")
    lines = [line.split() for line in text.splitlines()]
    missing = sorted(
        host
        for host, addresses in names.items()
        if not all(
            any(fields[:1] == [str(a)] and host in fields[1:] for fields in lines)
            for a in addresses
        )
    )
    detail = f"{path}: missing {', '.join(missing)}" if missing else f"{path}: stale"
    return Check(
        name,
        FAIL,
        detail,
        "the daemon rewrites it at its next poll; if it stays wrong, look at"
        " its log for the hosts file",
    )


def shadow_check(path: str, pinned: Iterable[str], names: Iterable[str]) -> Check:
    """
    Whether a line of the hosts file outside our section (C{pinned}: the
    names it sets) names one of C{names}, or a name under one of their
    wildcards: programs read it before they ask DNS.
    """
    name = "no hosts line shadows our names"
    ours = [n.lower() for n in names]
    shadowed = sorted(
        set(pinned).intersection(n for n in ours if not is_wildcard(n))
        | {p for p in pinned for n in ours if is_wildcard(n) and p.endswith(n[1:])}
    )
    if not shadowed:
        return Check(name, PASS, path)
    return Check(
        name,
        FAIL,
        f"{path} sets {', '.join(shadowed)} outside ngrokd's section",
        "programs take that line before they ask DNS, and ngrokd gives up a"
        " name set there at its next poll: remove the line",
    )


def server_check(
    where: str,
    asked: str,
    expected: Sequence[IPAddress],
    found: Sequence[str] | str,
) -> Check:
    """
    Whether our DNS server, on C{where}, answered C{asked} with every one
    of C{expected}; C{found} is the addresses it gave, or why it gave none.
    """
    name = "DNS server answers"
    if isinstance(found, str):
        return Check(
            name,
            FAIL,
            f"{where}: {asked}: {found}",
            "ngrokd runs it on dns.listen: see the names line of ngrokctl"
            " status; a firewall may drop the queries",
        )
    missing = [str(a) for a in expected if str(a) not in found]
    if missing:
        return Check(
            name,
            FAIL,
            f"{where}: {asked} is {', '.join(found) or 'nothing'}, not"
            f" {', '.join(missing)}",
            "the daemon gives the server its names at each poll: see its log",
        )
    return Check(name, PASS, f"{where}: {asked} is {', '.join(found)}")


def resolved_check(
    interface: str,
    state: LinkState | ResolvedError,
    server: IPAddress,
    domains: Sequence[str],
) -> Check:
    """
    Whether systemd-resolved sends C{domains} to our C{server} on our
    link: a DNS scope there (resolved gives none to a link that is down,
    has no carrier or no routable address), the server, every domain, and
    no default route.
    """
    name = "systemd-resolved routes our domains"
    if isinstance(state, ResolvedError):
        if state.not_running:
            return Check(
                name,
                FAIL,
                str(state),
                "start it (systemctl start systemd-resolved): ngrokd registers"
                " its link again once it is back, and meanwhile writes the"
                " names to the hosts file",
            )
        return Check(name, FAIL, f"{interface}: {state}", REGISTRATION_HINT)
    if not state.scopes & DNS_SCOPE:
        return Check(
            name,
            FAIL,
            f"{interface}: no DNS scope",
            "resolved gives none to a link that is down, without carrier or"
            f" without a routable address: see ip address show {interface}",
        )
    if server not in state.servers:
        servers = ", ".join(map(str, state.servers)) or "none"
        return Check(
            name,
            FAIL,
            f"{interface}: DNS servers {servers}, not {server}",
            REGISTRATION_HINT,
        )
    routing = {domain for domain, _ in state.domains}
    missing = [f"~{d}" for d in domains if d not in routing]
    if missing:
        return Check(
            name,
            FAIL,
            f"{interface}: no routing domain {' '.join(missing)}",
            REGISTRATION_HINT,
        )
    if state.default_route:
        return Check(
            name,
            FAIL,
            f"{interface} is a default route: every name goes to ngrokd's server",
            "something else manages the link too (NetworkManager?): have it"
            f" leave {interface} alone",
        )
    shown = " ".join(f"~{d}" for d in domains)
    return Check(name, PASS, f"{interface}: server {server}, domains {shown}")


def resolv_conf_check(path: str, target: str | None, text: str) -> Check:
    """
    Whether C{resolv.conf} (C{target}: where it links to) sends programs
    that read it to systemd-resolved's stub first, rather than straight to
    other servers (C{resolved}'s own upstream list, a DHCP client's) or to
    another local stub (a VPN client's, such as one on 127.0.2.2), which
    never see our domains.
    """
    name = "resolv.conf points at systemd-resolved"
    servers = [
        fields[1]
        for fields in (line.split() for line in text.splitlines())
        if len(fields) > 1 and fields[0] == "nameserver"
    ]
    where = f"{path} (a link to {target})" if target else path
    first = servers[0] if servers else "no server"
    if first == str(RESOLVED_STUB):
        return Check(name, PASS, f"{where}: nameserver {first}")
    try:
        local = ip_address(first.partition("%")[0]).is_loopback
    except ValueError:
        local = False
    if local:
        return Check(
            name,
            FAIL,
            f"{where} names {first} first, a local DNS stub that is not"
            " systemd-resolved's (a VPN client's?)",
            "programs that read resolv.conf never ask resolved, so never our"
            " server: have the VPN client hand its DNS to systemd-resolved,"
            " or link /etc/resolv.conf to /run/systemd/resolve/stub-resolv.conf",
        )
    return Check(
        name,
        FAIL,
        f"{where} names {first}, not systemd-resolved's stub {RESOLVED_STUB}:"
        " it is not managed by resolved",
        "programs that read resolv.conf never ask resolved, so never our"
        " server: ln -sf /run/systemd/resolve/stub-resolv.conf /etc/resolv.conf",
    )


def resolver_files_check(
    directory: str,
    domains: Sequence[str],
    contents: Mapping[str, bytes | None],
    server: IPAddress,
    port: int,
) -> Check:
    """
    Whether macOS's resolver has a file in C{directory} sending each of
    C{domains} to our C{server} and C{port} (C{contents}: each domain's
    file, C{None} where there is none).
    """
    name = "/etc/resolver files in place"
    wanted = resolver_file(server, port)
    missing = [f"{directory}/{d}" for d in domains if contents.get(d) is None]
    if missing:
        return Check(
            name,
            FAIL,
            f"missing {', '.join(missing)}",
            "ngrokd writes one for each domain at each poll, as root: see its log",
        )
    other = [f"{directory}/{d}" for d in domains if contents.get(d) != wanted]
    if other:
        return Check(
            name,
            FAIL,
            f"{', '.join(other)}: not ngrokd's, or not {server} port {port}",
            "ngrokd leaves a file it did not write alone: remove it",
        )
    return Check(name, PASS, f"{directory}: {', '.join(domains)}")


def resolves_check(
    host: str,
    expected: Sequence[IPAddress],
    found: Sequence[str] | str,
    dns_serves: bool = False,
) -> Check:
    """
    Whether C{getaddrinfo} gives C{host} (a name under it, for a wildcard)
    every one of its addresses, IPv4 and IPv6; C{found} is what it gave,
    or why it gave nothing.
    """
    name = f"{host} resolves"
    asked = lookup_name(host)
    shown = f"{asked}: " if asked != host else ""
    addresses = () if isinstance(found, str) else tuple(found)
    why = found if isinstance(found, str) else ", ".join(found) or "nothing"
    missing = [str(a) for a in expected if str(a) not in addresses]
    if not missing:
        return Check(name, PASS, shown + ", ".join(map(str, expected)))
    if dns_serves:
        hint = (
            "the checks above show where the way to ngrokd's DNS server"
            " breaks; a DNS cache may hold an old answer (resolvectl flush-caches)"
        )
    elif is_wildcard(host):
        hint = (
            "a hosts file cannot hold a wildcard: only ngrokd's DNS server"
            " answers the names under it, and the system does not ask it now"
            " (see the names line of ngrokctl status)"
        )
    else:
        hint = (
            "check /etc/nsswitch.conf puts files before dns, and that no local"
            " DNS cache holds an old answer"
        )
    return Check(name, FAIL, f"{shown}to {why}, not {', '.join(missing)}", hint)


def connect_address(row: dict[str, Any]) -> tuple[str, int] | None:
    """
    Where a program on this machine reaches C{row}'s listener.
    """
    address: str = row.get("listen_address") or ""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, int(port)
