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
L{Diagnosis} reads and connects (the names' hops through a
L{ngrokd.control.namewalk.NameWalk}), and never changes anything: the
daemon's files, the hosts file, resolved and the interface are left as they
are. Lookups and file reads (L{ngrokd.control.probes}) run in threads, each
bounded in time. At most L{MAX_ENDPOINTS} endpoints are tried per kind of
check.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool

from ngrokd.config import Config, ConfigError, load_config
from ngrokd.control import probes
from ngrokd.control.client import ControlError, connect
from ngrokd.control.hops import (
    certificate_check,
    connect_address,
    lookup_name,
    resolves_check,
    virtual_names,
)
from ngrokd.control.namewalk import LOOKUP_TIMEOUT, NameWalk
from ngrokd.control.verdict import FAIL, PASS, SKIP, Check
from ngrokd.datapath import wire
from ngrokd.datapath.ingress import DialFailed, IngressConnector
from ngrokd.datapath.upgrade import TLSFailed
from ngrokd.endpoints import (
    EndpointURLError,
    parse_endpoint_url,
)
from ngrokd.host.namechoice import (
    serves_by_dns,
)
from ngrokd.ngrok.api import APIError, APIUnavailable, NoAPIKey, make_api
from ngrokd.ngrok.trust import LateTrustPolicy, load_api_trust, load_ingress_trust

#: Endpoints tried per kind of check (upgrade, name, listener).
MAX_ENDPOINTS = 50
#: Seconds one connection attempt may take.
CONNECT_TIMEOUT = 5.0
_P = ParamSpec("_P")
_T = TypeVar("_T")


class Diagnosis:
    """
    Runs the checks against one config file and one control socket.

    @param reactor: connects (L{IReactorTCP}, L{IReactorUNIX}) and asks
        (L{IReactorUDP}); it must provide L{IReactorTime} and
        L{IReactorThreads} too.
    """

    def __init__(
        self,
        reactor: IReactorCore,
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
        self, work: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        threads = IReactorThreads(self._reactor)
        return deferToThreadPool(
            threads, threads.getThreadPool(), work, *args, **kwargs
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
        walk = NameWalk(self._reactor, self._thread, self._add)
        await walk.interface(config, names)
        await walk.dns(config, names)
        dns_serves = serves_by_dns(self._names_via)
        await walk.hosts(config, names, dns_serves)
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
        api = make_api(
            IReactorTCP(self._reactor),
            config.api.url,
            lambda: key,
            tls,
            CONNECT_TIMEOUT,
        )
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
            IReactorTCP(self._reactor),
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

    async def _lookup(self, host: str) -> list[str] | str:
        """
        The addresses C{getaddrinfo} gives C{host}, or why none, within
        L{LOOKUP_TIMEOUT} (the thread ends when the resolver gives up).
        """
        try:
            return await self._thread(probes.lookup, host).addTimeout(
                LOOKUP_TIMEOUT, IReactorTime(self._reactor)
            )
        except OSError as e:
            return str(e)
        except Exception:
            return f"no answer within {LOOKUP_TIMEOUT:g} s"

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
