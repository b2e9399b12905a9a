# -*- test-case-name: ngrokd.test.test_nameservice -*-
"""
How endpoint names reach programs: ngrokd's DNS server (L{ngrokd.dns}) on
an address of its own link, registered with the system's resolver; or the
hosts file.

At each reconcile the daemon hands L{NameService.apply} the names it serves,
each with its addresses. The service then, in order:

    - picks how names reach the system, once (L{choose_mode}: C{dns.mode};
      C{auto} asks the bus whether systemd-resolved runs);
    - starts the DNS server the first time, on L{NameService.own_addresses}
      (the daemon has put them on the link with the endpoints'): the first
      host of C{net.subnet}, and of the IPv6 block when there is one. IPv6
      is a bonus: when that address cannot be listened on (no IPv6 here),
      the server serves over IPv4 alone, says so once, and tries again at
      each apply;
      forwarding other names to the system's own upstream servers (read from
      resolved over D-Bus, else from the C{resolv.conf} they came from);
    - gives the server the table of names (wildcards too) and a probe name
      of its own, C{ngrokd-probe-TOKEN.ZONE}, answered with the server's
      address;
    - registers the server: with systemd-resolved (L{ngrokd.host.resolved}:
      routing domains, default route off, LLMNR and mDNS off, then the
      server's addresses), or in C{/etc/resolver} (L{ngrokd.host.resolverfiles});
    - checks it: the probe name is looked up through C{getaddrinfo}, in a
      thread (L{ngrokd.host.probe}). Only our server knows that name, so
      its address in the answer means the system asked our server.

Until that check passes, and whenever it fails, the names go to the hosts
file as before (L{NameService.hosts_names}), and the reason is in status
and said once in the log; once it passes, the hosts file holds only what
DNS cannot serve: nothing. A wildcard has no hosts line: with DNS not
reaching the system, it cannot be reached by name (L{NameService.unnamed}).

The decisions are pure functions (L{choose_mode}, L{server_listen},
L{server_listen6}, L{own_address}, L{hosts_names}, L{names_table}); the
service does the I/O.
"""

from __future__ import annotations

import secrets
import socket
import sys
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, ip_address
from typing import Any, Protocol, TypeVar

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ngrokd.config import Config, DnsConfig, NetConfig
from ngrokd.dns.server import Counters
from ngrokd.dns.service import DNSService
from ngrokd.dns.table import NameTable, build_table
from ngrokd.dns.upstreams import Address, upstreams_from_resolv_conf
from ngrokd.endpoints import is_wildcard, join_host_port
from ngrokd.host.allocation import IPAddress, IPNetwork
from ngrokd.host.dbus import SYSTEM_BUS, DBusConnection, DBusError, connect
from ngrokd.host.probe import PROBE_TIMEOUT, Lookup, probe
from ngrokd.host.resolved import (
    LinkSettings,
    ResolvedError,
    ResolvedLink,
    link_domains,
    resolved_running,
    upstream_servers,
)
from ngrokd.host.resolverfiles import RESOLVER_DIRECTORY, ResolverFiles
from ngrokd.plan import NameAddresses, uses_virtual
from ngrokd.readfile import read_regular

RESOLVED = "resolved"
RESOLVER_FILES = "resolver-files"
HOSTS = "hosts"
OFF = "off"
#: What each mode is called in status and the log.
_VIA = {
    RESOLVED: "systemd-resolved",
    RESOLVER_FILES: "/etc/resolver",
    HOSTS: "the hosts file",
    OFF: "the hosts file",
}
#: Where the upstream servers are read when resolved is not asked, in order:
#: resolved's own list of them, then the system's.
RESOLV_CONFS = ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf")
#: The most of a C{resolv.conf} read.
_RESOLV_CONF_LIMIT = 64 * 1024
#: Seconds after a failed check before a reconcile checks again.
PROBE_RETRY = 60.0
#: The port systemd-resolved sends a link's queries to.
_DNS_PORT = 53
#: macOS's lo0 has it: never added to the link, nor removed.
_LOOPBACK = IPv4Address("127.0.0.1")

_T = TypeVar("_T")


class LinkInfo(Protocol):
    """
    What the service needs to know of ngrokd's link (the interface service):
    C{subnet6} is the IPv6 block of its addresses, if any.
    """

    subnet6: IPNetwork | None

    def link_index(self) -> int | None: ...
    def describe(self) -> str: ...


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
        return _address(dns.listen)
    if uses_virtual(net.listen_interface, net.overrides):
        return str(net.subnet.network_address + 1), _DNS_PORT
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
    return str(subnet6.network_address + 1), _DNS_PORT


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
    return not via.startswith(_VIA[HOSTS])


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


class _Fallback(Exception):
    """
    The DNS server cannot serve the system's names now; the message says why.
    """


class NameService(Service):
    """
    The DNS server and its registration, from the first reconcile to the
    stop (see the module's docstring).

    @ivar changed: called when the names' route changed without a reconcile
        (resolved left, or came back and the check passed): the daemon
        applies the names again.
    """

    name = "names"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: Config,
        link: LinkInfo,
        platform: str = sys.platform,
        bus: Callable[[], Deferred[DBusConnection]] | None = None,
        resolver_directory: str = RESOLVER_DIRECTORY,
        resolv_confs: tuple[str, ...] = RESOLV_CONFS,
        lookup: Lookup = socket.getaddrinfo,
        probe_timeout: float = PROBE_TIMEOUT,
        flush: Any = None,
    ) -> None:
        """
        @param bus: connects to the system bus (tests give another).
        @param lookup: C{getaddrinfo}, for the check (tests give another).
        @param flush: runs the cache flush commands of C{/etc/resolver}
            (see L{ResolverFiles}).
        """
        self._reactor = reactor
        self._dns = config.dns
        self._net = config.net
        self._link_info = link
        self._platform = platform
        self._bus = bus or (lambda: connect(reactor, SYSTEM_BUS))
        self._resolver_directory = resolver_directory
        self._resolv_confs = resolv_confs
        self._lookup = lookup
        self._probe_timeout = probe_timeout
        self._flush = flush
        self._token = secrets.token_hex(4)
        self._lock = DeferredLock()
        self.changed: Callable[[], object] = lambda: None
        self._reset()

    def _reset(self) -> None:
        """
        Nothing set up: the state before the first apply, and after a stop
        or a reconfiguration.
        """
        self._mode: str | None = None
        #: Why C{auto} chose what it chose, for status.
        self._chosen_because = ""
        self._server: DNSService | None = None
        self._connection: DBusConnection | None = None
        self._link: ResolvedLink | None = None
        self._files: ResolverFiles | None = None
        self._registered: tuple[object, ...] | None = None
        #: Why the server does not listen on its IPv6 address ("": it does).
        self._no_ipv6 = ""
        self._dns_serves = False
        self._fallback = ""
        self._probed_at: float | None = None
        self._probe: str | None = None
        #: The names the table was last built from, and their domains.
        self._served: dict[str, NameAddresses] | None = None
        self._domains: tuple[str, ...] = ()
        self._stale = False

    # What the daemon asks

    def own_addresses(self) -> frozenset[IPAddress]:
        """
        The addresses the daemon puts on its link for the server.
        """
        own = own_address(server_listen(self._dns, self._net), self._net)
        listen6 = self._listen6()
        return frozenset(
            [
                *([] if own is None else [own]),
                *([] if listen6 is None else [ip_address(listen6[0])]),
            ]
        )

    def _listen6(self) -> Address | None:
        return server_listen6(self._dns, self._net, self._link_info.subnet6)

    def hosts_names(self, names: Mapping[str, _T]) -> dict[str, _T]:
        """
        What the hosts file must hold of C{names} now (L{hosts_names}).
        """
        return hosts_names(names, self._dns_serves)

    def unnamed(self, hosts: list[str]) -> dict[str, str]:
        """
        Why each wildcard of C{hosts} cannot be reached by name, when it
        cannot.
        """
        if self._dns_serves:
            return {}
        status = self.status()
        why = status.fallback or f"names reach this system through {status.via}"
        return {
            host: (
                f"no name under {host.removeprefix('*.')} reaches it: a hosts"
                f" file cannot hold a wildcard, and {why}"
            )
            for host in hosts
            if is_wildcard(host)
        }

    def status(self) -> NamesStatus:
        """
        How names reach programs now.
        """
        listen = server_listen(self._dns, self._net)
        mode = self._mode or self._dns.mode
        via = _VIA[mode] if self._dns_serves else _VIA[HOSTS]
        if self._chosen_because:
            via += f" ({self._chosen_because})"
        if self._server is not None and self._server.addresses:
            on = ", ".join(join_host_port(*a) for a in self._server.addresses)
            via += f"; DNS server on {on}"
        elif listen is not None and mode != OFF:
            via += "; DNS server not started yet"
        return NamesStatus(
            via,
            self._fallback,
            self._dns.mode in (RESOLVED, RESOLVER_FILES),
            self._dns_serves,
        )

    def server_address(self) -> Address | None:
        """
        Where the DNS server listens (its port found, for port 0), while it
        runs.
        """
        if self._server is None or not self._server.addresses:
            return None
        return self._server.addresses[0]

    def counters(self) -> Counters | None:
        """
        The DNS server's counters, while it runs.
        """
        return self._server.server.counters if self._server is not None else None

    def reconfigure(self, config: Config) -> None:
        """
        Use C{config}'s C{dns} and C{net} from the next apply on, set up
        afresh if that changes the DNS settings or where the server listens.
        """
        before = (self._dns, server_listen(self._dns, self._net))
        self._dns, self._net = config.dns, config.net
        if (self._dns, server_listen(self._dns, self._net)) != before:
            self._stale = True

    def apply(self, names: Mapping[str, NameAddresses]) -> Deferred[None]:
        """
        Serve C{names} (each with its IPv4 and IPv6 addresses), register and
        check the server as needed. Never fails: what goes wrong is the
        reason the hosts file is used.
        """
        return self._serially(lambda: self._apply(dict(names)))

    def stopService(self) -> Deferred[None]:
        """
        Revert resolved's link, remove our C{/etc/resolver} files, stop the
        server.
        """
        Service.stopService(self)
        return self._serially(self._teardown)

    # The work, one step at a time

    def _serially(self, work: Callable[[], Any]) -> Deferred[None]:
        return self._lock.run(lambda: Deferred.fromCoroutine(work()))

    async def _apply(self, names: dict[str, NameAddresses]) -> None:
        if self._stale:
            await self._teardown()
        listen = server_listen(self._dns, self._net)
        if listen is None or not self.running:
            self._mode = self._mode or (OFF if self._dns.mode == OFF else HOSTS)
            return
        try:
            if self._mode is None:
                self._mode = await self._choose()
            if self._server is None:
                await self._start_server(listen)
            assert self._server is not None
            self._listen_ipv6(self._server)
            server = ip_address(listen[0])
            if names != self._served:
                # A poll that changed nothing builds nothing.
                try:
                    domains = link_domains(names) if self._mode in _VIA_DNS else ()
                except ValueError as e:
                    raise _Fallback(str(e)) from e
                self._probe = probe_name(self._token, domains)
                self._server.set_table(names_table(names, self._probe, server))
                self._served, self._domains = names, domains
            domains, name = self._domains, self._probe
            changed = False
            if domains or self._registered is not None:
                # No names left: our domains go too, as their answers did.
                changed = await self._register(domains, listen)
            if name is None:
                self._set(dns_serves=False, fallback="")
                return
            if changed or self._due():
                await self._check(name, server)
        except _Fallback as e:
            self._set(dns_serves=False, fallback=str(e))
        except Exception as e:
            self.log.failure("setting up the DNS server failed")
            self._set(dns_serves=False, fallback=f"setting up DNS failed: {e!r}")

    async def _choose(self) -> str:
        """
        The mode, and for C{auto} the bus connection it needed.
        """
        configured = self._dns.mode
        if configured == HOSTS or (configured == "auto" and self._platform == "darwin"):
            return choose_mode(configured, self._platform, False)
        if configured == RESOLVER_FILES:
            return configured
        if not self._platform.startswith("linux"):
            if configured == RESOLVED:
                raise _Fallback(f"systemd-resolved is Linux's, not {self._platform}'s")
            return HOSTS
        try:
            runs = await resolved_running(await self._connect())
        except DBusError as e:
            if configured == RESOLVED:
                raise _Fallback(f"cannot ask systemd-resolved: {e}") from e
            self._chosen_because = f"dns.mode auto: no system bus: {e}"
            return HOSTS
        if configured == "auto" and not runs:
            self._chosen_because = "dns.mode auto: systemd-resolved is not running"
        return choose_mode(configured, self._platform, runs)

    async def _connect(self) -> DBusConnection:
        if self._connection is None:
            connection = self._connection = await self._bus()
            connection.when_lost().addCallback(self._bus_lost, connection)
        return self._connection

    def _bus_lost(self, why: str, connection: DBusConnection) -> None:
        """
        The bus connection closed (not by us): the next apply connects and
        registers again; until then, the hosts file.
        """
        if connection is not self._connection or not self.running:
            return
        self._connection = self._link = None
        self._registered = None
        self._set(dns_serves=False, fallback=f"lost the system bus: {why}")
        self.changed()

    async def _start_server(self, listen: Address) -> None:
        own = ip_address(listen[0])
        server = DNSService(
            [listen],
            await self._upstreams(own, listen),
            self._reactor,
        )
        try:
            server.startService()
        except CannotListenError as e:
            raise _Fallback(
                f"the DNS server cannot listen on {join_host_port(*listen)}:"
                f" {e.socketError}"
            ) from e
        self._server = server

    def _listen_ipv6(self, server: DNSService) -> None:
        """
        Listen on the server's IPv6 address too, when it has one and does
        not yet; when it cannot, say why once and serve over IPv4 alone.
        """
        listen6 = self._listen6()
        if listen6 is None or listen6[0] in (host for host, _ in server.addresses):
            return
        try:
            server.listen(listen6)
        except CannotListenError as e:
            reason = str(e.socketError)
            if reason != self._no_ipv6:
                self.log.warn(
                    "the DNS server cannot listen on {address}: {error}; it"
                    " serves over IPv4 alone",
                    address=join_host_port(*listen6),
                    error=reason,
                )
            self._no_ipv6 = reason
        else:
            self._no_ipv6 = ""

    async def _upstreams(self, own: IPAddress, listen: Address) -> list[Address]:
        """
        The servers other names go to: C{dns.upstreams}; else resolved's
        own (when it is asked); else the first C{resolv.conf} that names
        any we may use.
        """
        if self._dns.upstreams:
            return [_address(server) for server in self._dns.upstreams]
        if self._mode == RESOLVED:
            try:
                found = await upstream_servers(
                    await self._connect(),
                    self.own_addresses() | {own},
                    self._link_info.link_index() or -1,
                )
            except (DBusError, ResolvedError) as e:
                self.log.warn(
                    "DNS server: reading systemd-resolved's servers: {error};"
                    " reading resolv.conf instead",
                    error=str(e),
                )
            else:
                if found:
                    return [(str(u.address), u.port) for u in found]
        for path in self._resolv_confs:
            try:
                data, _ = await deferToThreadPool(
                    self._reactor,
                    self._reactor.getThreadPool(),
                    read_regular,
                    path,
                    _RESOLV_CONF_LIMIT,
                )
            except OSError:
                continue
            chosen = upstreams_from_resolv_conf(
                data.decode("utf-8", "replace"), [listen]
            )
            if chosen.servers:
                return list(chosen.servers)
        return []

    async def _register(self, domains: tuple[str, ...], listen: Address) -> bool:
        """
        Point the system's resolver at the server for C{domains}.

        @return: whether that changed anything.
        @raise _Fallback: it cannot be done now.
        """
        server = ip_address(listen[0])
        if self._mode == RESOLVER_FILES:
            wanted: tuple[object, ...] = (domains, server, listen[1])
            if wanted == self._registered:
                return False
            if self._files is None:
                self._files = ResolverFiles(
                    self._reactor,
                    self._reactor.getThreadPool(),
                    self._resolver_directory,
                    self._flush,
                )
            result = await self._files.apply(domains, server, listen[1])
            for problem in result.problems:
                self.log.warn("/etc/resolver: {problem}", problem=problem)
            self._registered = wanted
            return True
        index = self._link_info.link_index()
        if index is None:
            raise _Fallback(
                "systemd-resolved sends a domain's queries out of a link, and"
                f" ngrokd has no link of its own here ({self._link_info.describe()})"
            )
        if server not in self.own_addresses() or listen[1] != _DNS_PORT:
            raise _Fallback(
                "systemd-resolved asks a link's server from that link, on port"
                f" 53: dns.listen {join_host_port(*listen)} is not an address"
                f" of ngrokd's link on port 53 (leave dns.listen empty)"
            )
        assert self._server is not None
        servers = tuple(ip_address(host) for host, _ in self._server.addresses)
        settings = LinkSettings(index, servers, domains)
        if (settings,) == self._registered and self._link is not None:
            if self._link.error is not None:
                raise _Fallback(self._link.error)
            return False
        self._registered = (settings,)
        try:
            if self._link is None:
                self._link = ResolvedLink(
                    await self._connect(), settings, self._resolved_changed
                )
                await self._link.start()
            else:
                await self._link.update(settings)
        except (DBusError, ResolvedError) as e:
            raise _Fallback(str(e)) from e
        return True

    def _due(self) -> bool:
        """
        Whether the check should be made though nothing changed: it failed,
        L{PROBE_RETRY} seconds ago or more.
        """
        if self._dns_serves:
            return False
        last = self._probed_at
        return last is None or self._reactor.seconds() - last >= PROBE_RETRY

    async def _check(self, name: str, server: IPAddress) -> None:
        self._probed_at = self._reactor.seconds()
        result = await probe(
            self._reactor,
            self._reactor,
            self._reactor.getThreadPool(),
            name,
            server,
            self._probe_timeout,
            self._lookup,
        )
        if result.ok:
            self._set(dns_serves=True, fallback="")
        else:
            self._set(
                dns_serves=False,
                fallback=f"{_VIA[self._mode or HOSTS]} does not send our names to"
                f" the DNS server: {result.reason}",
            )

    def _resolved_changed(self) -> None:
        """
        resolved left the bus, or came back and took our settings again.
        """
        link = self._link
        if link is None or not self.running:
            return
        if link.error is not None:
            self._set(dns_serves=False, fallback=link.error)
            self.changed()
            return

        async def again() -> None:
            name, address = self._probe, self.server_address()
            if name is None or address is None or self._link is not link:
                return
            await self._check(name, ip_address(address[0]))
            if self._dns_serves:
                self.changed()

        self._serially(again)

    def _set(self, dns_serves: bool, fallback: str) -> None:
        """
        Record how names reach the system; say it when it changed.
        """
        if fallback and fallback != self._fallback:
            self.log.warn(
                "endpoint names are written to the hosts file: {reason}",
                reason=fallback,
            )
        if dns_serves and not self._dns_serves:
            self.log.info(
                "endpoint names resolve through {via} and ngrokd's DNS server",
                via=_VIA[self._mode or HOSTS],
            )
        self._dns_serves, self._fallback = dns_serves, fallback

    async def _teardown(self) -> None:
        """
        Undo the registration and stop the server; the next apply starts
        afresh.
        """
        link, files, server, connection = (
            self._link,
            self._files,
            self._server,
            self._connection,
        )
        self._reset()
        if link is not None:
            try:
                await link.stop()
            except ResolvedError as e:
                self.log.warn("systemd-resolved: {error}", error=str(e))
            else:
                self.log.info("systemd-resolved: our link's settings removed")
        if files is not None:
            result = await files.remove()
            for problem in result.problems:
                self.log.warn("/etc/resolver: {problem}", problem=problem)
        if connection is not None:
            await connection.close()
        if server is not None:
            await server.stopService()


#: The modes that register the DNS server with the system.
_VIA_DNS = frozenset({RESOLVED, RESOLVER_FILES})


def _address(text: str) -> Address:
    """
    C{address:port} (C{[ipv6]:port}) as a (host, port) pair.
    """
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)
