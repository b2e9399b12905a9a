# -*- test-case-name: ngrokd.test.test_diagnose,ngrokd.test.test_names_e2e -*-
"""
The names' part of C{ngrokctl diagnose}'s walk, for virtual-mode
endpoints: the interface has their addresses; ngrokd's DNS server answers
one of them (asked from here, on C{dns.listen}); the system's resolver is
pointed at it (systemd-resolved has our link with a DNS scope, our server
and our routing domains, and C{/etc/resolv.conf} sends programs to
resolved; or, on macOS, an C{/etc/resolver} file for each domain); the
hosts-file section is ours, and no line outside it names one of our names.

Each hop's check is a pure function (L{ngrokd.control.hops}); what is read
from files and the system runs in threads (L{ngrokd.control.probes}).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence
from ipaddress import ip_address

from twisted.internet.interfaces import IReactorCore, IReactorUDP, IReactorUNIX
from twisted.names import dns

from ngrokd.blocking import InThread
from ngrokd.config import Config
from ngrokd.control import probes
from ngrokd.control.hops import (
    REGISTRATION_HINT,
    hosts_check,
    lookup_name,
    resolv_conf_check,
    resolved_check,
    resolver_files_check,
    server_check,
    shadow_check,
)
from ngrokd.control.verdict import FAIL, PASS, Check
from ngrokd.dns.forward import Forwarder
from ngrokd.dns.upstreams import Address
from ngrokd.endpoints import join_host_port
from ngrokd.host.allocation import IPAddress
from ngrokd.host.dbus import SYSTEM_BUS, DBusError
from ngrokd.host.dbus import connect as connect_bus
from ngrokd.host.hostsection import pinned_names
from ngrokd.host.namechoice import (
    RESOLVED,
    RESOLVER_FILES,
    choose_mode,
    hosts_names,
    server_listen,
)
from ngrokd.host.resolved import (
    LinkState,
    ResolvedError,
    link_domains,
    read_link,
    resolved_running,
)
from ngrokd.host.resolverfiles import RESOLVER_DIRECTORY

#: Seconds a name lookup, or a query to our DNS server, may take.
LOOKUP_TIMEOUT = 5.0
#: Where programs find their DNS servers.
RESOLV_CONF = "/etc/resolv.conf"
_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class NameWalk:
    """
    Checks the hops of the names, each added with C{add}.

    @param reactor: asks our DNS server (L{IReactorUDP}, L{IReactorTime}
        and L{IReactorTCP}) and resolved, over D-Bus (L{IReactorUNIX}).
    @param thread: runs what blocks (reads, lookups) off the reactor thread.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        thread: InThread,
        add: Callable[[Check], bool],
    ) -> None:
        self._reactor = reactor
        self._thread = thread
        self._add = add

    async def interface(
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
            if not await self._thread(probes.is_local, address)
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

    async def dns(
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
            self._add(Check("routing domains", FAIL, str(e), REGISTRATION_HINT))
            return
        configured, server = config.dns.mode, ip_address(listen[0])
        interface = config.net.interface_name
        if choose_mode(configured, sys.platform, True) == RESOLVED:
            state = await self._resolved(configured, interface)
            if state is None:
                return
            self._add(resolved_check(interface, state, server, domains))
            target, text = await self._thread(probes.resolv_conf, RESOLV_CONF)
            self._add(resolv_conf_check(RESOLV_CONF, target, text))
        elif choose_mode(configured, sys.platform, False) == RESOLVER_FILES:
            contents = await self._thread(
                probes.resolver_files, RESOLVER_DIRECTORY, domains
            )
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
        asker = Forwarder([listen], IReactorUDP(self._reactor), LOOKUP_TIMEOUT)
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
            bus = await connect_bus(IReactorUNIX(self._reactor), SYSTEM_BUS)
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

    async def hosts(
        self,
        config: Config,
        names: dict[str, tuple[IPAddress, ...]],
        dns_serves: bool,
    ) -> None:
        if not names:
            return
        path = config.net.hosts_file
        try:
            text = await self._thread(probes.read_text, path)
        except OSError as e:
            self._add(Check("hosts section matches", FAIL, f"{path}: {e.strerror}"))
            return
        instance = config.server.instance
        self._add(hosts_check(path, text, hosts_names(names, dns_serves), instance))
        self._add(shadow_check(path, pinned_names(text, instance), names))


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
