# -*- test-case-name: ngrokd.test.test_resolved -*-
"""
ngrokd's DNS server registered with systemd-resolved, over D-Bus.

resolved sends the queries for a link's routing domains (C{~prod}) to that
link's DNS servers, out of that link: so the server must listen on an
address of ngrokd's own link, and the link must be up, with a carrier and
a routable address, or resolved gives it no DNS scope. The settings are
made in the order resolved's documentation (C{docs/RESOLVED-VPNS.md}) asks
of a VPN-like link, domains and C{default-route false} before the servers,
so that no query leaks to our server before routing is in place, and so
that names outside our domains never reach it; LLMNR, mDNS, DNSSEC and DNS
over TLS are turned off on the link (our server does none of them).

resolved forgets every setting when it restarts: L{ResolvedLink} watches
the bus name C{org.freedesktop.resolve1} change owner and applies them
again. A clean stop reverts the link (C{RevertLink}).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Set
from ipaddress import ip_address
from typing import Any

from attrs import frozen
from jeepney import DBusAddress
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from ngrokd.dns.zones import routing_domains
from ngrokd.endpoints import is_dns_name
from ngrokd.host.allocator import IPAddress
from ngrokd.host.dbus import (
    BUS,
    PROPERTIES,
    DBusConnection,
    DBusError,
    ErrorReply,
    method_call,
    name_owner_changed,
    property_get,
)

BUS_NAME = "org.freedesktop.resolve1"
MANAGER = DBusAddress(
    "/org/freedesktop/resolve1", BUS_NAME, "org.freedesktop.resolve1.Manager"
)
#: resolved's own stub listeners: never an upstream (that is a loop).
STUB_ADDRESSES = frozenset({ip_address("127.0.0.53"), ip_address("127.0.0.54")})
#: The most routing domains resolved takes on one link
#: (C{LINK_SEARCH_DOMAINS_MAX}).
MAX_DOMAINS = 256
#: What resolved answers when it is not running (the calls never start it).
_NOT_RUNNING = (
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.ServiceUnknown",
)
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
#: The interface of resolved's per-link objects.
LINK_INTERFACE = "org.freedesktop.resolve1.Link"
#: The bit of a link's C{ScopesMask} that says it has a DNS scope
#: (C{SD_RESOLVED_DNS}).
DNS_SCOPE = 1


class ResolvedError(Exception):
    """
    resolved did not take a setting, or could not be asked. C{dbus_name} is
    the D-Bus error it answered, if it answered one.
    """

    def __init__(self, text: str, dbus_name: str | None = None) -> None:
        super().__init__(text)
        self.dbus_name = dbus_name

    @property
    def not_running(self) -> bool:
        """
        resolved was not on the bus to answer.
        """
        return self.dbus_name in _NOT_RUNNING


class TooManyDomains(ValueError):
    """
    More routing domains than resolved takes on one link.
    """


def link_domains(names: Iterable[str]) -> tuple[str, ...]:
    """
    The routing domains that send every one of C{names} (host names, or
    C{*.suffix} wildcards) to our server: the zones it serves alone, by the
    one rule for them (L{ngrokd.dns.zones.routing_domains}: never a public
    parent zone), as many as resolved takes on one link.

    @raise ValueError: naming a name that is not a DNS name.
    @raise TooManyDomains: past L{MAX_DOMAINS}.
    """
    names = list(names)
    for name in names:
        if not is_dns_name(name.lower().rstrip(".").removeprefix("*.")):
            raise ValueError(f"{name!r} is not a DNS name")
    domains = routing_domains(names)
    if len(domains) > MAX_DOMAINS:
        raise TooManyDomains(
            f"{len(domains)} routing domains: systemd-resolved takes at most"
            f" {MAX_DOMAINS} on one link"
        )
    return domains


@frozen
class LinkSettings:
    """
    What resolved is asked to do with link C{ifindex}: send the names under
    C{domains} to C{servers} (port 53) and nothing else.
    """

    ifindex: int
    servers: tuple[IPAddress, ...]
    domains: tuple[str, ...]


def link_calls(settings: LinkSettings) -> tuple[Any, ...]:
    """
    The method calls that give resolved C{settings}, in the order they must
    be made.
    """
    link = settings.ifindex

    def set_link(member: str, signature: str, *body: object) -> Any:
        return method_call(MANAGER, member, signature, (link, *body))

    return (
        set_link("SetLinkDomains", "ia(sb)", [(d, True) for d in settings.domains]),
        set_link("SetLinkDefaultRoute", "ib", False),
        set_link("SetLinkLLMNR", "is", "no"),
        set_link("SetLinkMulticastDNS", "is", "no"),
        set_link("SetLinkDNSSEC", "is", "no"),
        set_link("SetLinkDNSOverTLS", "is", "no"),
        set_link(
            "SetLinkDNS",
            "ia(iay)",
            [(_FAMILIES[s.version], s.packed) for s in settings.servers],
        ),
    )


def resolved_running(connection: DBusConnection) -> Deferred[bool]:
    """
    Whether resolved is on the bus now (for C{dns.mode: auto}).
    """
    d = connection.call(BUS.NameHasOwner(BUS_NAME))
    return d.addCallback(lambda body: bool(body[0]))


@frozen
class Upstream:
    """
    A DNS server resolved uses, to forward other names to: C{ifindex} is the
    link it belongs to (0 for a global one), C{server_name} its TLS name.
    """

    address: IPAddress
    port: int
    ifindex: int
    server_name: str


def choose_upstreams(
    entries: Iterable[tuple[Any, ...]], ignore: Set[IPAddress], own_ifindex: int
) -> tuple[Upstream, ...]:
    """
    The servers of resolved's C{DNSEx} (or C{DNS}: no port, no name) entries
    that are not resolved's stub, not one of C{ignore} (our own addresses)
    and not on our own link, in resolved's order, without repeats.
    """
    chosen: list[Upstream] = []
    for entry in entries:
        ifindex, _, packed = entry[:3]
        port = entry[3] if len(entry) > 3 and entry[3] else 53
        name = entry[4] if len(entry) > 4 else ""
        try:
            address = ip_address(bytes(packed))
        except ValueError:
            continue
        upstream = Upstream(address, port, ifindex, name)
        if (
            address in STUB_ADDRESSES
            or address in ignore
            or ifindex == own_ifindex
            or upstream in chosen
        ):
            continue
        chosen.append(upstream)
    return tuple(chosen)


def upstream_servers(
    connection: DBusConnection, ignore: Set[IPAddress], own_ifindex: int
) -> Deferred[tuple[Upstream, ...]]:
    """
    The DNS servers resolved itself asks, read from its C{DNSEx} property
    (C{DNS} before systemd 246), for names that are not ours.

    @return: a Deferred that fails with L{ResolvedError}.
    """

    async def read() -> tuple[Upstream, ...]:
        try:
            try:
                body = await connection.call(property_get(MANAGER, "DNSEx"))
            except ErrorReply as e:
                if not e.name.endswith((".UnknownProperty", ".InvalidArgs")):
                    raise
                body = await connection.call(property_get(MANAGER, "DNS"))
        except DBusError as e:
            raise _resolved_error(
                e, "cannot read systemd-resolved's DNS servers"
            ) from e
        return choose_upstreams(body[0][1], ignore, own_ifindex)

    return Deferred.fromCoroutine(read())


@frozen
class LinkState:
    """
    What resolved does with one link now, as its C{Link} object says: the
    C{ScopesMask} (L{DNS_SCOPE}: it sends queries there), the servers, the
    domains (C{(name, routing only)}), whether it is a default route.
    """

    scopes: int
    servers: tuple[IPAddress, ...]
    domains: tuple[tuple[str, bool], ...]
    default_route: bool


def read_link(connection: DBusConnection, ifindex: int) -> Deferred[LinkState]:
    """
    resolved's state of link C{ifindex}, from its C{Link} object's
    properties (for C{ngrokctl diagnose}).

    @return: a Deferred that fails with L{ResolvedError}.
    """

    async def read() -> LinkState:
        try:
            (path,) = await connection.call(
                method_call(MANAGER, "GetLink", "i", (ifindex,))
            )
            link = DBusAddress(path, BUS_NAME, PROPERTIES)
            (found,) = await connection.call(
                method_call(link, "GetAll", "s", (LINK_INTERFACE,))
            )
        except DBusError as e:
            raise _resolved_error(e, f"cannot read link {ifindex}") from e
        properties = {name: value for name, (_, value) in found.items()}
        servers = []
        for _, packed in properties.get("DNS", []):
            try:
                servers.append(ip_address(bytes(packed)))
            except ValueError:
                continue
        return LinkState(
            int(properties.get("ScopesMask", 0)),
            tuple(servers),
            tuple((str(d), bool(r)) for d, r in properties.get("Domains", [])),
            bool(properties.get("DefaultRoute", False)),
        )

    return Deferred.fromCoroutine(read())


def _resolved_error(error: DBusError, doing: str) -> ResolvedError:
    """
    A D-Bus failure as a L{ResolvedError} saying what was being done.
    """
    dbus_name = error.name if isinstance(error, ErrorReply) else None
    if dbus_name in _NOT_RUNNING:
        return ResolvedError(f"{doing}: systemd-resolved is not running", dbus_name)
    return ResolvedError(f"{doing}: {error}", dbus_name)


class ResolvedLink:
    """
    resolved's settings for our link, kept as asked from L{start} to
    L{stop}: applied again whenever resolved (re)appears on the bus.

    @ivar error: why the settings are not in place now (C{None} when they
        are), for status.
    @param on_change: called when resolved leaves the bus, and after the
        settings were applied again when it came back: what C{error} says
        changed without a call of ours.
    """

    log = Logger()

    def __init__(
        self,
        connection: DBusConnection,
        settings: LinkSettings,
        on_change: Callable[[], object] = lambda: None,
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._on_change = on_change
        self._lock = DeferredLock()
        self._dirty = False
        self._stopped = False
        self.error: str | None = "not applied yet"

    def start(self) -> Deferred[None]:
        """
        Watch resolved come and go, and apply the settings.

        @return: a Deferred that fails with L{ResolvedError} if they could
            not be applied now (they are again when resolved restarts).
        """

        async def start() -> None:
            try:
                await self._connection.subscribe(
                    name_owner_changed(BUS_NAME), self._owner_changed
                )
            except DBusError as e:
                raise _resolved_error(e, "cannot watch systemd-resolved") from e
            await self._request()

        return Deferred.fromCoroutine(start())

    def update(self, settings: LinkSettings) -> Deferred[None]:
        """
        Apply C{settings} instead (the domains changed).
        """
        self._settings = settings
        return self._request()

    def stop(self) -> Deferred[None]:
        """
        Stop applying, and revert the link to resolved's defaults once an
        apply under way has ended; nothing to do when resolved is not
        running.
        """
        self._stopped = True
        return self._lock.run(self._revert)

    def _owner_changed(self, body: tuple[Any, ...]) -> None:
        _, _, new_owner = body
        if self._stopped:
            return
        if not new_owner:
            self.error = "systemd-resolved stopped"
            self.log.warn(
                "systemd-resolved stopped; our names resolve again once it is back"
            )
            self._on_change()
            return
        self.log.info(
            "systemd-resolved (re)started: applying our link's settings again"
        )
        if not self._dirty:
            self._request().addBoth(lambda _: self._stopped or self._on_change())

    def _request(self) -> Deferred[None]:
        self._dirty = True
        return self._lock.run(self._apply)

    async def _apply(self) -> None:
        if self._stopped:
            return
        if not self._dirty:
            # Applied while this request waited: share that outcome.
            if self.error is not None:
                raise ResolvedError(self.error)
            return
        self._dirty = False
        settings = self._settings
        try:
            for call in link_calls(settings):
                await self._connection.call(call)
        except DBusError as e:
            error = _resolved_error(e, f"link {settings.ifindex}")
            if str(error) != self.error:
                self.log.warn("systemd-resolved: {error}", error=str(error))
            self.error = str(error)
            raise error from e
        self.error = None
        try:
            await self._connection.call(method_call(MANAGER, "FlushCaches"))
        except DBusError as e:
            self.log.info("systemd-resolved kept its cache: {error}", error=str(e))

    async def _revert(self) -> None:
        link = self._settings.ifindex
        try:
            await self._connection.call(
                method_call(MANAGER, "RevertLink", "i", (link,))
            )
        except DBusError as e:
            error = _resolved_error(e, f"cannot revert link {link}")
            if error.dbus_name not in _NOT_RUNNING:
                raise error from e
        self.error = "stopped"
