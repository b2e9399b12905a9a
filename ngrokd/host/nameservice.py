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

The decisions are pure functions (L{ngrokd.host.namechoice}), the
registration one way per mode (L{ngrokd.host.registration}); the service
does the I/O, in order.
"""

from __future__ import annotations

import secrets
import socket
import sys
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import (
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)
from twisted.logger import Logger

from ngrokd.config import Config
from ngrokd.dns.server import Counters
from ngrokd.dns.service import DNSService
from ngrokd.dns.upstreams import Address
from ngrokd.endpoints import join_host_port
from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.host.dbus import SYSTEM_BUS, DBusConnection, DBusError, connect
from ngrokd.host.dnsserver import (
    RESOLV_CONFS,
    find_upstreams,
    listen_ipv6,
    start_server,
)
from ngrokd.host.namechoice import (
    DNS_PORT,
    HOSTS,
    OFF,
    RESOLVED,
    RESOLVER_FILES,
    VIA,
    VIA_DNS,
    Fallback,
    NamesStatus,
    choose_mode,
    hosts_names,
    names_status,
    names_table,
    own_addresses,
    probe_name,
    server_listen,
    server_listen6,
    unnamed,
)
from ngrokd.host.netif.darwin import Runner
from ngrokd.host.probe import PROBE_TIMEOUT, Lookup, probe
from ngrokd.host.registration import FilesRegistration, ResolvedRegistration
from ngrokd.host.resolved import (
    LinkSettings,
    ResolvedLink,
    Upstream,
    link_domains,
    resolved_running,
    upstream_servers,
)
from ngrokd.host.resolverfiles import RESOLVER_DIRECTORY, ResolverFiles
from ngrokd.plan import NameAddresses

#: Seconds after a failed check before a reconcile checks again.
PROBE_RETRY = 60.0

_T = TypeVar("_T")


class LinkInfo(Protocol):
    """
    What the service needs to know of ngrokd's link (the interface service):
    C{subnet6} is the IPv6 block of its addresses, if any.
    """

    subnet6: IPNetwork | None

    def link_index(self) -> int | None: ...
    def describe(self) -> str: ...


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
        reactor: IReactorThreads,
        config: Config,
        link: LinkInfo,
        platform: str = sys.platform,
        bus: Callable[[], Deferred[DBusConnection]] | None = None,
        resolver_directory: str = RESOLVER_DIRECTORY,
        resolv_confs: tuple[str, ...] = RESOLV_CONFS,
        lookup: Lookup = socket.getaddrinfo,
        probe_timeout: float = PROBE_TIMEOUT,
        flush: Runner | None = None,
    ) -> None:
        """
        @param reactor: runs the checks and reads in its thread pool, and the
            DNS server; it must provide C{IReactorTime}, C{IReactorTCP} and
            C{IReactorUDP} too, and C{IReactorUNIX} for the system bus.
        @param bus: connects to the system bus (tests give another).
        @param lookup: C{getaddrinfo}, for the check (tests give another).
        @param flush: runs the cache flush commands of C{/etc/resolver}
            (see L{ResolverFiles}).
        """
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._dns = config.dns
        self._net = config.net
        self._link_info = link
        self._platform = platform
        self._bus = bus or (lambda: connect(IReactorUNIX(reactor), SYSTEM_BUS))
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
        self._registration: FilesRegistration | ResolvedRegistration | None = None
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
        return own_addresses(self._dns, self._net, self._link_info.subnet6)

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
        cannot (L{unnamed}).
        """
        return unnamed(hosts, self.status())

    def status(self) -> NamesStatus:
        """
        How names reach programs now.
        """
        return names_status(
            self._dns,
            self._net,
            self._mode,
            self._dns_serves,
            self._chosen_because,
            self._server.addresses if self._server is not None else [],
            self._fallback,
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
            self._no_ipv6 = listen_ipv6(
                self._server, self._listen6(), self._no_ipv6, self.log
            )
            server = ip_address(listen[0])
            if names != self._served:
                # A poll that changed nothing builds nothing.
                try:
                    domains = link_domains(names) if self._mode in VIA_DNS else ()
                except ValueError as e:
                    raise Fallback(str(e)) from e
                self._probe = probe_name(self._token, domains)
                self._server.set_table(names_table(names, self._probe, server))
                self._served, self._domains = names, domains
            domains, name = self._domains, self._probe
            changed = False
            if domains or (
                self._registration is not None and self._registration.registered
            ):
                # No names left: our domains go too, as their answers did.
                changed = await self._register(domains, listen)
            if name is None:
                self._set(dns_serves=False, fallback="")
                return
            if changed or self._due():
                await self._check(name, server)
        except Fallback as e:
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
                raise Fallback(f"systemd-resolved is Linux's, not {self._platform}'s")
            return HOSTS
        try:
            runs = await resolved_running(await self._connect())
        except DBusError as e:
            if configured == RESOLVED:
                raise Fallback(f"cannot ask systemd-resolved: {e}") from e
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
        self._connection = None
        if self._registration is not None:
            self._registration.forget()
        self._set(dns_serves=False, fallback=f"lost the system bus: {why}")
        self.changed()

    async def _start_server(self, listen: Address) -> None:
        own = ip_address(listen[0])
        upstreams = await find_upstreams(
            self._reactor,
            self._dns.upstreams,
            (lambda: self._resolved_upstreams(own)) if self._mode == RESOLVED else None,
            self._resolv_confs,
            listen,
            self.log,
        )
        self._server = start_server(IReactorTCP(self._reactor), listen, upstreams)

    async def _resolved_upstreams(self, own: IPAddress) -> tuple[Upstream, ...]:
        """
        The servers resolved itself asks (not ours).
        """
        return await upstream_servers(
            await self._connect(),
            self.own_addresses() | {own},
            self._link_info.link_index() or -1,
        )

    async def _register(self, domains: tuple[str, ...], listen: Address) -> bool:
        """
        Point the system's resolver at the server for C{domains}.

        @return: whether that changed anything.
        @raise Fallback: it cannot be done now.
        """
        server = ip_address(listen[0])
        if self._mode == RESOLVER_FILES:
            if not isinstance(self._registration, FilesRegistration):
                self._registration = FilesRegistration(self._resolver_files, self.log)
            return await self._registration.register(domains, server, listen[1])
        index = self._link_info.link_index()
        if index is None:
            raise Fallback(
                "systemd-resolved sends a domain's queries out of a link, and"
                f" ngrokd has no link of its own here ({self._link_info.describe()})"
            )
        if server not in self.own_addresses() or listen[1] != DNS_PORT:
            raise Fallback(
                "systemd-resolved asks a link's server from that link, on port"
                f" 53: dns.listen {join_host_port(*listen)} is not an address"
                f" of ngrokd's link on port 53 (leave dns.listen empty)"
            )
        assert self._server is not None
        servers = tuple(ip_address(host) for host, _ in self._server.addresses)
        if not isinstance(self._registration, ResolvedRegistration):
            self._registration = ResolvedRegistration(
                self._connect, self._resolved_changed, self.log
            )
        return await self._registration.register(LinkSettings(index, servers, domains))

    def _resolver_files(self) -> ResolverFiles:
        return ResolverFiles(
            self._reactor,
            self._reactor.getThreadPool(),
            self._resolver_directory,
            self._flush,
        )

    def _resolved_link(self) -> ResolvedLink | None:
        """
        resolved's settings for our link, while they are kept.
        """
        registration = self._registration
        if isinstance(registration, ResolvedRegistration):
            return registration.link
        return None

    def _due(self) -> bool:
        """
        Whether the check should be made though nothing changed: it failed,
        L{PROBE_RETRY} seconds ago or more.
        """
        if self._dns_serves:
            return False
        last = self._probed_at
        return last is None or self._clock.seconds() - last >= PROBE_RETRY

    async def _check(self, name: str, server: IPAddress) -> None:
        self._probed_at = self._clock.seconds()
        result = await probe(
            self._reactor,
            self._clock,
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
                fallback=f"{VIA[self._mode or HOSTS]} does not send our names to"
                f" the DNS server: {result.reason}",
            )

    def _resolved_changed(self) -> None:
        """
        resolved left the bus, or came back and took our settings again.
        """
        link = self._resolved_link()
        if link is None or not self.running:
            return
        if link.error is not None:
            self._set(dns_serves=False, fallback=link.error)
            self.changed()
            return

        async def again() -> None:
            name, address = self._probe, self.server_address()
            if name is None or address is None or self._resolved_link() is not link:
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
                via=VIA[self._mode or HOSTS],
            )
        self._dns_serves, self._fallback = dns_serves, fallback

    async def _teardown(self) -> None:
        """
        Undo the registration and stop the server; the next apply starts
        afresh.
        """
        registration, server, connection = (
            self._registration,
            self._server,
            self._connection,
        )
        self._reset()
        if registration is not None:
            await registration.remove()
        if connection is not None:
            await connection.close()
        if server is not None:
            await server.stopService()
