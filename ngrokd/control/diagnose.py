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

The checks are pure functions of what was read (L{ngrokd.control.hops});
L{Diagnosis} reads and connects, and never changes anything: the daemon's
files, the hosts file, resolved and the interface are left as they are.
Lookups and file reads (L{ngrokd.control.probes}) run in threads, each
bounded in time. At most L{MAX_ENDPOINTS} endpoints are tried per kind of
check.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.names import dns

from ngrokd.config import Config, ConfigError, load_config
from ngrokd.control import probes
from ngrokd.control.client import ControlError, connect
from ngrokd.control.hops import (
    REGISTRATION_HINT,
    certificate_check,
    connect_address,
    hosts_check,
    lookup_name,
    resolv_conf_check,
    resolved_check,
    resolver_files_check,
    resolves_check,
    server_check,
    shadow_check,
    virtual_names,
)
from ngrokd.control.interfaces import IControlReactor
from ngrokd.control.verdict import FAIL, PASS, SKIP, Check
from ngrokd.datapath import wire
from ngrokd.datapath.ingress import DialFailed, IngressConnector, TLSFailed
from ngrokd.dns.forward import Forwarder
from ngrokd.dns.upstreams import Address
from ngrokd.endpoints import (
    EndpointURLError,
    join_host_port,
    parse_endpoint_url,
)
from ngrokd.host.allocation import IPAddress
from ngrokd.host.dbus import SYSTEM_BUS, DBusError
from ngrokd.host.dbus import connect as connect_bus
from ngrokd.host.hosts import pinned_names
from ngrokd.host.nameservice import (
    RESOLVED,
    RESOLVER_FILES,
    choose_mode,
    hosts_names,
    server_listen,
    serves_by_dns,
)
from ngrokd.host.resolved import (
    LinkState,
    ResolvedError,
    link_domains,
    read_link,
    resolved_running,
)
from ngrokd.host.resolverfiles import RESOLVER_DIRECTORY
from ngrokd.ngrok.api import APIError, APIUnavailable, NoAPIKey, make_api
from ngrokd.ngrok.trust import LateTrustPolicy, load_api_trust, load_ingress_trust

#: Endpoints tried per kind of check (upgrade, name, listener).
MAX_ENDPOINTS = 50
#: Seconds one connection attempt may take.
CONNECT_TIMEOUT = 5.0
#: Seconds a name lookup, or a query to our DNS server, may take.
LOOKUP_TIMEOUT = 5.0
#: Where programs find their DNS servers.
RESOLV_CONF = "/etc/resolv.conf"
_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_P = ParamSpec("_P")
_T = TypeVar("_T")


class Diagnosis:
    """
    Runs the checks against one config file and one control socket.
    """

    def __init__(
        self,
        reactor: IControlReactor,
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

    def _thread(
        self, work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), work, *args, **kwargs
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
            cert_pem = await self._thread(probes.read, server.client_cert)
            key_pem = await self._thread(probes.read, server.client_key)
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
            return await self._thread(probes.lookup, host).addTimeout(
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
            text = await self._thread(probes.read_text, path)
        except OSError as e:
            self._add(Check("hosts section matches", FAIL, f"{path}: {e.strerror}"))
            return
        instance = config.server.instance
        self._add(hosts_check(path, text, hosts_names(names, dns_serves), instance))
        self._add(shadow_check(path, pinned_names(text, instance), names))

    async def _listener(self, row: dict[str, Any]) -> None:
        target = connect_address(row)
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
