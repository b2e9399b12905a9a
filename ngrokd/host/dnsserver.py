# -*- test-case-name: ngrokd.test.test_nameservice -*-
"""
ngrokd's DNS server as L{ngrokd.host.nameservice} runs it: started on its
address of ngrokd's link, forwarding other names to the system's own
upstream servers, and listening on its IPv6 address too when it can. Apart
from the service so that where those upstream servers come from
(C{dns.upstreams}, resolved, a C{resolv.conf}) is read in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ngrokd.dns.service import DNSService
from ngrokd.dns.upstreams import Address, upstreams_from_resolv_conf
from ngrokd.endpoints import join_host_port
from ngrokd.host.dbus import DBusError
from ngrokd.host.namechoice import Fallback, parse_address
from ngrokd.host.resolved import ResolvedError, Upstream
from ngrokd.readfile import read_regular

#: Where the upstream servers are read when resolved is not asked, in order:
#: resolved's own list of them, then the system's.
RESOLV_CONFS = ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf")
#: The most of a C{resolv.conf} read.
_RESOLV_CONF_LIMIT = 64 * 1024


def start_server(
    reactor: IReactorTCP, listen: Address, upstreams: Sequence[Address]
) -> DNSService:
    """
    The DNS server, listening on C{listen}.

    @raise Fallback: it cannot listen there.
    """
    server = DNSService([listen], upstreams, reactor)
    try:
        server.startService()
    except CannotListenError as e:
        raise Fallback(
            f"the DNS server cannot listen on {join_host_port(*listen)}:"
            f" {e.socketError}"
        ) from e
    return server


def listen_ipv6(
    server: DNSService, listen6: Address | None, failing: str, log: Logger
) -> str:
    """
    Listen on the server's IPv6 address C{listen6} too, when it has one and
    does not yet; when it cannot, say why once (C{failing}: why it could
    not the last time) and serve over IPv4 alone.

    @return: why the server does not listen on C{listen6} (C{""}: it does).
    """
    if listen6 is None or listen6[0] in (host for host, _ in server.addresses):
        return failing
    try:
        server.listen(listen6)
    except CannotListenError as e:
        reason = str(e.socketError)
        if reason != failing:
            log.warn(
                "the DNS server cannot listen on {address}: {error}; it"
                " serves over IPv4 alone",
                address=join_host_port(*listen6),
                error=reason,
            )
        return reason
    return ""


async def find_upstreams(
    reactor: IReactorThreads,
    configured: Sequence[str],
    resolved: Callable[[], Awaitable[Sequence[Upstream]]] | None,
    resolv_confs: Sequence[str],
    listen: Address,
    log: Logger,
) -> list[Address]:
    """
    The servers other names go to: C{configured} (C{dns.upstreams}); else
    C{resolved}'s own (when it is asked); else the first of C{resolv_confs}
    that names any we may use (not the server on C{listen}).
    """
    if configured:
        return [parse_address(server) for server in configured]
    if resolved is not None:
        try:
            found = await resolved()
        except (DBusError, ResolvedError) as e:
            log.warn(
                "DNS server: reading systemd-resolved's servers: {error};"
                " reading resolv.conf instead",
                error=str(e),
            )
        else:
            if found:
                return [(str(u.address), u.port) for u in found]
    for path in resolv_confs:
        try:
            data, _ = await deferToThreadPool(
                reactor, reactor.getThreadPool(), read_regular, path, _RESOLV_CONF_LIMIT
            )
        except OSError:
            continue
        chosen = upstreams_from_resolv_conf(data.decode("utf-8", "replace"), [listen])
        if chosen.servers:
            return list(chosen.servers)
    return []
