# -*- test-case-name: ngrokd.test.test_diagnose -*-
"""
C{ngrokctl diagnose}: walk the path a connection takes and name the first
broken hop.

The hops, in order: the config file; the daemon (its control socket); the
ngrok API and the key; this machine's certificate; the binding ingress
(name, TCP, TLS and an upgrade for each endpoint); the interface and its
addresses; then the names of virtual-mode endpoints: ngrokd's DNS server
answers one of them (asked from here, on C{dns.listen}); the system's
resolver is pointed at it (systemd-resolved has our link with a DNS scope,
our server and our routing domains, and C{/etc/resolv.conf} sends programs
to resolved, not to another stub such as a VPN client's; or, on macOS, an
C{/etc/resolver} file for each domain); the hosts-file section, and no line
outside it naming one of our names; each name (a name under a wildcard for
a wildcard) through C{getaddrinfo} to its IPv4 and IPv6 addresses; each
listener. Each check is a L{Check} with a hint for what to do; those that
cannot run because an earlier hop is broken are skipped.

The checks are pure functions of what was read (C{*_check}); L{Diagnosis}
reads and connects, and never changes anything: the daemon's files, the
hosts file, resolved and the interface are left as they are. Lookups and
file reads run in threads, each bounded in time. At most L{MAX_ENDPOINTS}
endpoints are tried per kind of check.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import ip_address
from typing import Any, TypeVar

from attrs import frozen
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.names import dns

from ngrokd.config import Config, ConfigError, load_config
from ngrokd.control.client import ControlError, connect
from ngrokd.datapath import wire
from ngrokd.datapath.ingress import DialFailed, IngressConnector
from ngrokd.datapath.upgrade import TLSFailed
from ngrokd.dns.forward import Forwarder
from ngrokd.dns.upstreams import Address
from ngrokd.endpoints import (
    EndpointURLError,
    is_wildcard,
    join_host_port,
    parse_endpoint_url,
)
from ngrokd.host.allocation import IPAddress
from ngrokd.host.dbus import SYSTEM_BUS, DBusError
from ngrokd.host.dbus import connect as connect_bus
from ngrokd.host.hostsection import pinned_names, render
from ngrokd.host.namechoice import (
    RESOLVED,
    RESOLVER_FILES,
    choose_mode,
    hosts_names,
    server_listen,
    serves_by_dns,
)
from ngrokd.host.resolved import (
    DNS_SCOPE,
    LinkState,
    ResolvedError,
    link_domains,
    read_link,
    resolved_running,
)
from ngrokd.host.resolverfiles import RESOLVER_DIRECTORY, resolver_file
from ngrokd.ngrok.api import APIError, APIUnavailable, NoAPIKey, make_api
from ngrokd.ngrok.trust import LateTrustPolicy, load_api_trust, load_ingress_trust
from ngrokd.plan import VIRTUAL
from ngrokd.readfile import read_regular

PASS = "pass"
FAIL = "fail"
SKIP = "skip"

#: Endpoints tried per kind of check (upgrade, name, listener).
MAX_ENDPOINTS = 50
#: Seconds one connection attempt may take.
CONNECT_TIMEOUT = 5.0
#: Seconds a name lookup, or a query to our DNS server, may take.
LOOKUP_TIMEOUT = 5.0
#: Where programs find their DNS servers.
RESOLV_CONF = "/etc/resolv.conf"
#: systemd-resolved's stub, which a C{resolv.conf} it manages names.
RESOLVED_STUB = ip_address("127.0.0.53")
#: The most of C{resolv.conf}, or of an C{/etc/resolver} file, read.
_FILE_LIMIT = 64 * 1024
#: The first label of the name looked up for a wildcard (C{*.apps.prod}).
SAMPLE_LABEL = "ngrokd-diagnose"
_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_REGISTRATION_HINT = (
    "ngrokd registers its link at each poll: see the names line of ngrokctl"
    " status and the daemon's log"
)
_T = TypeVar("_T")


@frozen
class Check:
    """
    One hop: what was checked, how it went, what was found, what to do.
    """

    name: str
    state: str
    detail: str = ""
    hint: str = ""


def first_broken(checks: Iterable[Check]) -> Check | None:
    """
    The first failed check, where the path breaks.
    """
    return next((check for check in checks if check.state == FAIL), None)


def check_lines(checks: Sequence[Check]) -> list[str]:
    """
    The checks as text: a line each, its hint below a failed one, then the
    verdict.
    """
    lines = []
    for check in checks:
        detail = f": {check.detail}" if check.detail else ""
        lines.append(f"{check.state.upper():4}  {check.name}{detail}")
        if check.hint and check.state == FAIL:
            lines.append(f"      hint: {check.hint}")
    broken = first_broken(checks)
    lines.append(f"first broken hop: {broken.name}" if broken else "every check passed")
    return lines


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
        return Check(name, FAIL, f"{interface}: {state}", _REGISTRATION_HINT)
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
            _REGISTRATION_HINT,
        )
    routing = {domain for domain, _ in state.domains}
    missing = [f"~{d}" for d in domains if d not in routing]
    if missing:
        return Check(
            name,
            FAIL,
            f"{interface}: no routing domain {' '.join(missing)}",
            _REGISTRATION_HINT,
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


def _connect_address(row: dict[str, Any]) -> tuple[str, int] | None:
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


class Diagnosis:
    """
    Runs the checks against one config file and one control socket.
    """

    def __init__(
        self,
        reactor: Any,
        config_path: str,
        socket_path: str,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
            datetime.UTC
        ),
        instance: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._config_path = config_path
        self._instance = instance
        self._socket = socket_path
        self._now = now
        self.checks: list[Check] = []
        #: How the daemon says names reach programs (status's C{names_via}).
        self._names_via = ""

    def _thread(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), work, *args
        )

    def _add(self, check: Check) -> bool:
        self.checks.append(check)
        return check.state == PASS

    async def run(self) -> list[Check]:
        """
        Every check, in the order of the path.
        """
        config = await self._config()
        if config is None:
            return self.checks
        rows = await self._daemon()
        await self._api(config)
        identity = await self._certificate(config)
        await self._ingress(config, identity, rows)
        names = virtual_names(rows)
        await self._interface(config, names)
        await self._dns(config, names)
        dns_serves = serves_by_dns(self._names_via)
        await self._hosts(config, names, dns_serves)
        for host, addresses in list(names.items())[:MAX_ENDPOINTS]:
            found = await self._lookup(lookup_name(host))
            self._add(resolves_check(host, addresses, found, dns_serves))
        for row in rows[:MAX_ENDPOINTS]:
            await self._listener(row)
        return self.checks

    async def _config(self) -> Config | None:
        name = "config valid"
        try:
            loaded = await self._thread(
                load_config, self._config_path, os.environ, sys.platform, self._instance
            )
        except ConfigError as e:
            self._add(Check(name, FAIL, str(e), "fix the file and run diagnose again"))
            return None
        self._add(Check(name, PASS, self._config_path))
        return loaded.config

    async def _daemon(self) -> list[dict[str, Any]]:
        name = "daemon reachable"
        try:
            control = await connect(self._reactor, self._socket)
        except ControlError as e:
            self._add(
                Check(
                    name,
                    FAIL,
                    str(e),
                    "start it (systemctl start ngrokd) or name its socket with"
                    " --socket",
                )
            )
            return []
        try:
            status = await control.status()
            rows = [row async for row in control.endpoints()]
        finally:
            control.close()
        self._names_via = status.get("names_via", "")
        detail = f"{self._socket}: {status['endpoints']} endpoints"
        if not status["ready"]:
            detail += f", not ready: {status['not_ready_because']}"
        self._add(Check(name, PASS, detail))
        return rows

    async def _api(self, config: Config) -> None:
        name = "API reachable, key accepted"
        tls = LateTrustPolicy()
        try:
            tls.use(await self._thread(load_api_trust, config.api.ca_bundle))
        except Exception as e:
            self._add(Check(name, FAIL, str(e), "fix api.ca_bundle"))
            return
        key = config.api.key
        api = make_api(self._reactor, config.api.url, lambda: key, tls, CONNECT_TIMEOUT)
        try:
            await api.operators()
        except NoAPIKey as e:
            self._add(Check(name, FAIL, str(e), "ngrokctl set-api-key < keyfile"))
        except APIError as e:
            hint = (
                "the key is refused: make a new one in ngrok's dashboard and"
                " run ngrokctl set-api-key"
                if e.status in (401, 403)
                else "see ngrok's status page"
            )
            self._add(Check(name, FAIL, str(e), hint))
        except APIUnavailable as e:
            self._add(
                Check(name, FAIL, str(e), f"check that {config.api.url} is reachable")
            )
        else:
            self._add(Check(name, PASS, config.api.url))
        finally:
            await api.close()

    async def _certificate(self, config: Config) -> tuple[bytes, bytes] | None:
        server = config.server
        try:
            cert_pem = await self._thread(_read, server.client_cert)
            key_pem = await self._thread(_read, server.client_key)
        except OSError as e:
            self._add(
                Check(
                    "certificate valid",
                    FAIL,
                    f"{e.filename}: {e.strerror}",
                    "the daemon registers once it has an API key; run diagnose"
                    " as the daemon's user (root)",
                )
            )
            return None
        check = certificate_check(cert_pem, server.client_cert, self._now())
        return (cert_pem, key_pem) if self._add(check) else None

    async def _ingress(
        self,
        config: Config,
        identity: tuple[bytes, bytes] | None,
        rows: list[dict[str, Any]],
    ) -> None:
        ingress = config.ingress
        where = f"{ingress.host}:{ingress.port}"
        found = await self._lookup(ingress.host)
        if isinstance(found, str) or not found:
            self._add(
                Check(
                    "ingress resolves",
                    FAIL,
                    f"{ingress.host}: {found or 'no address'}",
                    "check DNS, or ingressEndpoint in the config",
                )
            )
            return
        self._add(Check("ingress resolves", PASS, f"{ingress.host}: {found[0]}"))
        targets = []
        for row in rows:
            try:
                targets.append(parse_endpoint_url(row["url"]))
            except EndpointURLError:
                continue
        if identity is None or not targets:
            why = "no certificate" if identity is None else "no endpoints to try"
            self._add(Check("ingress TLS verifies", SKIP, why))
            return
        ca = ingress.ca_bundle or "the system's trust and /etc/ssl/certs/ngrok"
        try:
            trust = await self._thread(load_ingress_trust, ingress.ca_bundle)
        except Exception as e:
            self._add(
                Check("ingress TLS verifies", FAIL, str(e), "fix ingress.ca_bundle")
            )
            return
        connector = IngressConnector(
            self._reactor,
            ingress.host,
            ingress.port,
            trust,
            CONNECT_TIMEOUT,
            ingress.upgrade_timeout,
            ingress.insecure_skip_verify,
        )
        connector.use_certificate(*identity)
        for index, target in enumerate(targets[:MAX_ENDPOINTS]):
            name = f"upgrade answers for {target.url}"
            try:
                upgraded = await connector.connect(
                    wire.ConnRequest(host=target.host, port=target.port)
                )
            except DialFailed as e:
                self._add(
                    Check(
                        "ingress TCP connects",
                        FAIL,
                        str(e),
                        f"check that this machine may reach {where} (firewall, proxy)",
                    )
                )
                return
            except TLSFailed as e:
                self._add(
                    Check(
                        "ingress TLS verifies",
                        FAIL,
                        f"{e} (verified against {ca})",
                        "ingress.ca_bundle must hold ngrok's intermediate CA",
                    )
                )
                return
            except Exception as e:
                if index == 0:
                    self._connected(where, ca)
                self._add(
                    Check(
                        name,
                        FAIL,
                        str(e),
                        "check that the endpoint is still bound to this operator",
                    )
                )
                continue
            upgraded.transport.loseConnection()
            if index == 0:
                self._connected(where, ca)
            self._add(Check(name, PASS))

    def _connected(self, where: str, ca: str) -> None:
        """
        The first upgrade got past TCP and TLS, whatever its answer.
        """
        self._add(Check("ingress TCP connects", PASS, where))
        self._add(Check("ingress TLS verifies", PASS, f"against {ca}"))

    async def _interface(
        self, config: Config, names: dict[str, tuple[IPAddress, ...]]
    ) -> None:
        if not names:
            return
        interface = config.net.interface_name
        if sys.platform == "linux":
            present = {name for _, name in socket.if_nameindex()}
            if interface not in present:
                self._add(
                    Check(
                        "interface present",
                        FAIL,
                        interface,
                        "the daemon needs CAP_NET_ADMIN to make it: see its log",
                    )
                )
                return
        every = sorted({a for addresses in names.values() for a in addresses}, key=str)
        missing = [
            str(address)
            for address in every
            if not await self._thread(_is_local, address)
        ]
        if missing:
            self._add(
                Check(
                    "addresses present",
                    FAIL,
                    f"not on this machine: {', '.join(missing)}",
                    "the daemon adds them at its next poll; see its log",
                )
            )
        else:
            self._add(Check("addresses present", PASS, f"{len(every)} addresses"))

    async def _dns(
        self, config: Config, names: dict[str, tuple[IPAddress, ...]]
    ) -> None:
        """
        Our DNS server answers, and the system's resolver is pointed at it.
        """
        listen = server_listen(config.dns, config.net)
        if listen is None or not names:
            return
        host, expected = next(iter(names.items()))
        asked = lookup_name(host)
        found = await self._query(listen, asked, expected)
        where = join_host_port(*listen)
        self._add(server_check(where, asked, expected, found))
        try:
            domains = link_domains(names)
        except ValueError as e:
            self._add(Check("routing domains", FAIL, str(e), _REGISTRATION_HINT))
            return
        configured, server = config.dns.mode, ip_address(listen[0])
        interface = config.net.interface_name
        if choose_mode(configured, sys.platform, True) == RESOLVED:
            state = await self._resolved(configured, interface)
            if state is None:
                return
            self._add(resolved_check(interface, state, server, domains))
            target, text = await self._thread(_resolv_conf, RESOLV_CONF)
            self._add(resolv_conf_check(RESOLV_CONF, target, text))
        elif choose_mode(configured, sys.platform, False) == RESOLVER_FILES:
            contents = await self._thread(_resolver_files, RESOLVER_DIRECTORY, domains)
            self._add(
                resolver_files_check(
                    RESOLVER_DIRECTORY, domains, contents, server, listen[1]
                )
            )

    async def _query(
        self, listen: Address, name: str, expected: Sequence[IPAddress]
    ) -> list[str] | str:
        """
        What our server on C{listen} answers for C{name}: its addresses
        (AAAA asked too when C{expected} has an IPv6 one), or why none.
        """
        asker = Forwarder([listen], self._reactor, LOOKUP_TIMEOUT)
        types = [dns.A] + ([dns.AAAA] if any(a.version == 6 for a in expected) else [])
        found: list[str] = []
        try:
            for qtype in types:
                answer = await asker.forward(dns.Query(name, qtype), tcp=False)
                if answer.rCode != dns.OK:
                    code = _RCODES.get(answer.rCode, f"rcode {answer.rCode}")
                    return f"answered {code}"
                found += _answered(answer)
        except Exception as e:
            return f"no answer: {e.__class__.__name__}"
        finally:
            asker.stop()
        return found

    async def _resolved(
        self, configured: str, interface: str
    ) -> LinkState | ResolvedError | None:
        """
        What systemd-resolved does with our link, or why it cannot say;
        C{None} when names do not go through it (C{dns.mode auto}, and it
        is not running or there is no bus).
        """
        try:
            bus = await connect_bus(self._reactor, SYSTEM_BUS)
        except DBusError as e:
            if configured == "auto":
                return None
            return ResolvedError(f"cannot ask systemd-resolved: {e}")
        try:
            if configured == "auto" and not await resolved_running(bus):
                return None
            try:
                index = socket.if_nametoindex(interface)
            except OSError:
                return ResolvedError(f"no link {interface} here")
            return await read_link(bus, index)
        except ResolvedError as e:
            return e
        except DBusError as e:
            return ResolvedError(f"cannot ask systemd-resolved: {e}")
        finally:
            await bus.close()

    async def _lookup(self, host: str) -> list[str] | str:
        """
        The addresses C{getaddrinfo} gives C{host}, or why none, within
        L{LOOKUP_TIMEOUT} (the thread ends when the resolver gives up).
        """
        try:
            return await self._thread(_lookup, host).addTimeout(
                LOOKUP_TIMEOUT, self._reactor
            )
        except OSError as e:
            return str(e)
        except Exception:
            return f"no answer within {LOOKUP_TIMEOUT:g} s"

    async def _hosts(
        self,
        config: Config,
        names: dict[str, tuple[IPAddress, ...]],
        dns_serves: bool,
    ) -> None:
        if not names:
            return
        path = config.net.hosts_file
        try:
            text = await self._thread(_read_text, path)
        except OSError as e:
            self._add(Check("hosts section matches", FAIL, f"{path}: {e.strerror}"))
            return
        instance = config.server.instance
        self._add(hosts_check(path, text, hosts_names(names, dns_serves), instance))
        self._add(shadow_check(path, pinned_names(text, instance), names))

    async def _listener(self, row: dict[str, Any]) -> None:
        target = _connect_address(row)
        name = f"{row.get('url') or row.get('id')} listener accepts"
        if target is None:
            self._add(
                Check(
                    name,
                    FAIL,
                    row.get("reason", ""),
                    "ngrokctl list shows why; a port in use names its owner",
                )
            )
            return
        host, port = target
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT)
        where = f"{host}:{port}"
        try:
            probe = Protocol()
            await endpoint.connect(Factory.forProtocol(lambda: probe))
        except Exception as e:
            self._add(
                Check(
                    name,
                    FAIL,
                    f"{where}: {e}",
                    "another program may hold the port, or a firewall drops it",
                )
            )
            return
        if probe.transport is not None:
            probe.transport.loseConnection()
        self._add(Check(name, PASS, where))


def _lookup(host: str) -> list[str]:
    """
    The addresses C{getaddrinfo} gives C{host}, IPv4 and IPv6.

    @raise OSError: it gave none.
    """
    found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _answered(answer: dns.Message) -> list[str]:
    """
    The addresses of C{answer}'s A and AAAA records.
    """
    found: list[str] = []
    for record in answer.answers:
        payload = record.payload
        if isinstance(payload, dns.Record_A | dns.Record_AAAA):
            found.append(str(ip_address(payload.address)))
    return found


def _resolv_conf(path: str) -> tuple[str | None, str]:
    """
    Where C{path} links to (C{None}: it is no link) and its text (C{""}
    when it cannot be read).
    """
    try:
        target: str | None = os.readlink(path)
    except OSError:
        target = None
    try:
        data, _ = read_regular(path, _FILE_LIMIT)
    except OSError:
        return target, ""
    return target, data.decode("utf-8", "replace")


def _resolver_files(directory: str, domains: Sequence[str]) -> dict[str, bytes | None]:
    """
    Each domain's file in C{directory} (C{None}: none, or unreadable).
    """
    contents: dict[str, bytes | None] = {}
    for domain in domains:
        try:
            contents[domain], _ = read_regular(
                os.path.join(directory, domain), _FILE_LIMIT
            )
        except OSError:
            contents[domain] = None
    return contents


def _is_local(address: IPAddress) -> bool:
    """
    Whether C{address} is on one of this machine's interfaces (only then can
    a socket bind to it).
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


def _read_text(path: str) -> str:
    return _read(path).decode("utf-8", "replace")
