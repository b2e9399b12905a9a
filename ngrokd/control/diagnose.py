# -*- test-case-name: ngrokd.test.test_diagnose -*-
"""
C{ngrokctl diagnose}: walk the path a connection takes and name the first
broken hop.

The hops, in order: the config file; the daemon (its control socket); the
ngrok API and the key; this machine's certificate; the binding ingress
(name, TCP, TLS and an upgrade for each endpoint); the interface and its
addresses; the hosts-file section; each name through the system resolver;
each listener. Each check is a L{Check} with a hint for what to do; those
that cannot run because an earlier hop is broken are skipped. The checks
read and connect, never change anything: the daemon's files, the hosts file
and the interface are left as they are. Lookups and file reads run in
threads. At most L{MAX_ENDPOINTS} endpoints are tried per kind of check.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from ipaddress import ip_address
from typing import Any, TypeVar

from attrs import frozen
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool

from ngrokd.config import Config, ConfigError, load_config
from ngrokd.control.client import ControlError, connect
from ngrokd.datapath import wire
from ngrokd.datapath.ingress import DialFailed, IngressConnector, TLSFailed
from ngrokd.endpoints import EndpointURLError, parse_endpoint_url
from ngrokd.host.allocation import IPAddress
from ngrokd.host.hosts import render
from ngrokd.ngrok.api import APIError, APIUnavailable, NoAPIKey, make_api
from ngrokd.ngrok.trust import LateTrustPolicy, load_api_trust, load_ingress_trust
from ngrokd.plan import VIRTUAL

PASS = "pass"
FAIL = "fail"
SKIP = "skip"

#: Endpoints tried per kind of check (upgrade, name, listener).
MAX_ENDPOINTS = 50
#: Seconds one connection attempt may take.
CONNECT_TIMEOUT = 5.0
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


def virtual_names(rows: Iterable[dict[str, Any]]) -> dict[str, IPAddress]:
    """
    The hosts-file names the daemon's virtual-mode endpoints want, with
    their addresses.
    """
    names: dict[str, IPAddress] = {}
    for row in rows:
        if row.get("mode") == VIRTUAL and row.get("listen_address"):
            address = row["listen_address"].rpartition(":")[0].strip("[]")
            host = row["client_address"].rpartition(":")[0].strip("[]")
            names[host] = ip_address(address)
    return names


def hosts_check(
    path: str, text: str, names: dict[str, IPAddress], instance: str = ""
) -> Check:
    """
    Whether the hosts file's section of ngrokd instance C{instance} holds
    exactly C{names}.
    """
    name = "hosts section matches"
    if render(text, names, instance) == text:
        return Check(name, PASS, f"{path}: {len(names)} names")
    missing = sorted(
        host
        for host, address in names.items()
        if not any(
            line.split()[:1] == [str(address)] and host in line.split()[1:]
            for line in text.splitlines()
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


def resolves_check(host: str, address: IPAddress, found: Sequence[str]) -> Check:
    """
    Whether the system resolver gives C{host} its address.
    """
    name = f"{host} resolves"
    if str(address) in found:
        return Check(name, PASS, str(address))
    return Check(
        name,
        FAIL,
        f"to {', '.join(found) or 'nothing'}, not {address}",
        "check /etc/nsswitch.conf puts files before dns, and that no local DNS"
        " cache holds an old answer",
    )


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
        await self._hosts(config, names)
        for host, address in list(names.items())[:MAX_ENDPOINTS]:
            found = await self._thread(_lookup, host)
            self._add(resolves_check(host, address, found))
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
        found = await self._thread(_lookup, ingress.host)
        if not found:
            self._add(
                Check(
                    "ingress resolves",
                    FAIL,
                    f"{ingress.host}: no address",
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

    async def _interface(self, config: Config, names: dict[str, IPAddress]) -> None:
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
        missing = [
            str(address)
            for address in sorted(set(names.values()))
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
            self._add(
                Check(
                    "addresses present", PASS, f"{len(set(names.values()))} addresses"
                )
            )

    async def _hosts(self, config: Config, names: dict[str, IPAddress]) -> None:
        if not names:
            return
        path = config.net.hosts_file
        try:
            text = await self._thread(_read_text, path)
        except OSError as e:
            self._add(Check("hosts section matches", FAIL, f"{path}: {e.strerror}"))
            return
        self._add(hosts_check(path, text, names, config.server.instance))

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
    The addresses the system resolver gives C{host} (none on failure).
    """
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in found))


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
