# -*- test-case-name: ngrokd.test.test_status -*-
"""
What each discovered endpoint is doing, for C{ngrokctl list} and status.

Every endpoint of the last good poll has a row, those that could not be
served too (the original hid them): an unreadable URL, no address or port
left for it, a listening socket refused (port in use, address missing). A
listening endpoint whose last forwarded connection failed says why, since
"listening" alone would hide an upstream that refuses; while the client
certificate is expired, every listening endpoint says that. L{endpoint_status}
is a pure function of the daemon's state; L{ngrokd.board} keeps the rows
it would make, changing each only where its facts change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import attrs
from attrs import frozen

from ngrokd.endpoints import BoundEndpoint, join_host_port
from ngrokd.plan import VIRTUAL, ListenSpec, Plan
from ngrokd.problems import Problem

LISTENING = "listening"
STARTING = "starting"
FAILED = "failed"


class ListenerCounts(Protocol):
    """
    What one listener has carried, as status reads it.
    """

    @property
    def connections_open(self) -> int: ...
    @property
    def connections_total(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def last_error(self) -> str: ...


class ListenerState(Protocol):
    """
    One endpoint's listener as status reads it (the data path's listeners
    have this shape): its spec, whether it listens, why not, its counts.
    """

    @property
    def spec(self) -> ListenSpec: ...
    @property
    def listening(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def stats(self) -> ListenerCounts: ...


@frozen
class EndpointStatus:
    """
    One bound endpoint: ngrok's id and URL, where it listens locally
    (C{""} when it does not), its state and the reason for it, and what its
    listener has carried. Endpoints that share a URL share a listener, so
    their counts are the same.

    @ivar reason: why a C{failed} endpoint is not served; for a
        C{listening} one, the failure of its most recent connection when
        that one failed (C{""} otherwise).
    @ivar client_address: what a program on this machine connects to: the
        endpoint's own name and port in virtual mode, an address and the
        network port otherwise.
    @ivar mode: C{virtual}, or the network-mode address it listens on
        (C{""} when it has no listener).
    """

    id: str
    url: str
    listen_address: str
    state: str
    reason: str
    client_address: str = ""
    connections_open: int = 0
    connections_total: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    mode: str = ""
    #: The endpoint comes from the list an earlier run kept, not yet
    #: confirmed by the API (down since the start).
    stale: bool = False
    #: The addresses it listens on: in virtual mode its name's IPv4 and
    #: IPv6 addresses, else the network-mode address.
    addresses: tuple[str, ...] = ()
    #: Why it does not listen on its name's IPv6 address though it has one
    #: (its socket could not be bound); it is served over IPv4.
    ipv6_error: str = ""


@frozen
class DaemonStatus:
    """
    The daemon as a whole, for C{ngrokctl status}, C{/status} and
    readiness: who it is to ngrok, how discovery goes, what it serves.
    Times are the reactor clock's seconds since the epoch.

    @ivar identity_state: the identity service's state, e.g. C{registered}
        or C{not registered, waiting for an API key}.
    @ivar identity_error: the current registration or renewal problem.
    @ivar polled: whether the endpoints of one good poll have been applied.
    @ivar last_poll: when the last good poll answered (C{None}: never).
    @ivar poll_error: why the polls since then failed (C{""}: they did not).
    @ivar listeners_planned: the listeners the plan wants.
    @ivar listeners_up: how many of those listen.
    @ivar listeners_unplanned: the endpoint URLs that should listen but got
        no listener, for a reason of this machine's: no address or network
        port was left, or the address could not be set up (their rows say
        why). An endpoint no change here could serve (an unreadable URL,
        two endpoints on one socket) is not counted: it is listed, and does
        not hold readiness back.
    """

    version: str
    started: float
    now: float
    identity_state: str
    operator_id: str
    certificate_expires: float | None
    identity_error: str
    ingress_endpoint: str
    polled: bool
    last_poll: float | None
    poll_error: str
    poll_failures: int
    endpoints: int
    listeners_planned: int
    listeners_up: int
    #: Why the last reload was refused (C{""}: it was not).
    config_error: str = ""
    #: Changed config keys that wait for a restart.
    restart_pending: tuple[str, ...] = ()
    #: The endpoints served are the list an earlier run kept, not yet
    #: confirmed by the API (down since the start).
    stale: bool = False
    #: Connections to the ingress kept ready for the next accepted ones.
    warm_connections: int = 0
    listeners_unplanned: int = 0
    #: Why the names of virtual-mode endpoints do not resolve: the hosts
    #: file could not be written (C{""}: they do, or none are wanted).
    names_error: str = ""
    #: What keeps failing (a state file that cannot be saved, the hosts
    #: file), until it works again.
    problems: tuple[Problem, ...] = ()
    #: How endpoint names reach programs (C{systemd-resolved; DNS server
    #: on 10.107.0.1:53}, C{the hosts file}).
    names_via: str = ""
    #: Why the hosts file serves the names instead of the DNS server
    #: (C{""}: it does not, or DNS was not asked for).
    names_fallback: str = ""
    #: C{dns.mode} names a way (not C{auto}): a fallback is not what was
    #: configured, and the daemon is not ready.
    names_strict: bool = False
    #: The block of the names' IPv6 addresses (C{""}: IPv6 is off).
    ipv6_subnet: str = ""
    #: Why names have no IPv6 address on this machine (C{""}: they do, or
    #: IPv6 is off); they are served over IPv4.
    ipv6_error: str = ""

    @property
    def registered(self) -> bool:
        return self.operator_id != ""

    @property
    def uptime(self) -> float:
        return max(0.0, self.now - self.started)

    @property
    def listeners_wanted(self) -> int:
        """
        The listeners there should be: those planned, and those that could
        not even be planned for a reason of this machine's.
        """
        return self.listeners_planned + self.listeners_unplanned

    @property
    def certificate_expired(self) -> bool:
        return self.certificate_expires is not None and (
            self.now >= self.certificate_expires
        )

    @property
    def ready(self) -> bool:
        """
        Serving what it should: see L{not_ready_because} (a daemon with no
        endpoints is ready).
        """
        return self.not_ready_because == ""

    @property
    def not_ready_because(self) -> str:
        """
        The first step towards ready that is not done (C{""}: none): a valid
        identity, one poll applied, every wanted listener up, the names
        written and resolving as C{dns.mode} says. This is readiness for
        C{/readyz}, C{ngrokctl health},
        C{ngrokd_ready} and systemd alike.
        """
        why = f": {self.identity_error}" if self.identity_error else ""
        if not self.registered:
            return f"{self.identity_state}{why}"
        if self.certificate_expired:
            return f"the client certificate has expired{why}"
        if not self.polled:
            why = f": {self.poll_error}" if self.poll_error else ""
            return f"the bound endpoints have not been read yet{why}"
        if self.listeners_up != self.listeners_wanted:
            return f"{self.listeners_up} of {self.listeners_wanted} listeners are up"
        if self.names_error:
            return f"endpoint names do not resolve: {self.names_error}"
        if self.names_fallback and self.names_strict:
            return (
                "endpoint names do not resolve as configured (the hosts file"
                f" serves them meanwhile): {self.names_fallback}"
            )
        return ""


def endpoint_status(
    endpoints: Mapping[str, BoundEndpoint],
    skipped: Mapping[str, str],
    plan: Plan,
    listeners: Mapping[str, ListenerState],
    certificate_problem: str = "",
    stale: bool = False,
    unnamed: Mapping[str, str] | None = None,
    listeners6: Mapping[str, ListenerState] | None = None,
) -> tuple[EndpointStatus, ...]:
    """
    A row per endpoint, ordered by URL then id.

    @param endpoints: the endpoints of the last good poll, by id.
    @param skipped: why the endpoints that could not be parsed were left
        out, by id (the reason names the URL).
    @param plan: the plan made from C{endpoints}.
    @param listeners: the listeners, by normalised URL.
    @param certificate_problem: why the client certificate cannot work now
        (it expired): the reason of every listening endpoint, whose
        connections all fail for it.
    @param stale: C{endpoints} is the list an earlier run kept, not (yet)
        confirmed by the API: every row says so.
    @param unnamed: why a hostname cannot be reached by name (a wildcard
        without DNS), by hostname: the reason of its listening endpoints
        that have no other.
    @param listeners6: the IPv6 listeners, by normalised URL.
    """
    rows = [skipped_row(id, reason) for id, reason in skipped.items()]
    for endpoint in endpoints.values():
        rows.append(
            endpoint_row(
                endpoint, plan, listeners, certificate_problem, unnamed, listeners6
            )
        )
    if stale:
        rows = [attrs.evolve(row, stale=True) for row in rows]
    return tuple(sorted(rows, key=lambda row: (row.url, row.id)))


def skipped_row(id: str, reason: str) -> EndpointStatus:
    """
    The row of an endpoint whose URL could not be read.
    """
    return EndpointStatus(id=id, url="", listen_address="", state=FAILED, reason=reason)


def endpoint_row(
    endpoint: BoundEndpoint,
    plan: Plan,
    listeners: Mapping[str, ListenerState],
    certificate_problem: str = "",
    unnamed: Mapping[str, str] | None = None,
    listeners6: Mapping[str, ListenerState] | None = None,
) -> EndpointStatus:
    """
    The row of one endpoint (see L{endpoint_status}).
    """
    row = _row(endpoint, plan, listeners, certificate_problem, unnamed or {})
    return _with_ipv6(row, (listeners6 or {}).get(endpoint.target.url))


def _row(
    endpoint: BoundEndpoint,
    plan: Plan,
    listeners: Mapping[str, ListenerState],
    certificate_problem: str,
    unnamed: Mapping[str, str],
) -> EndpointStatus:
    key = endpoint.target.url
    failure = plan.failures.get(key)
    if failure is not None:
        return EndpointStatus(endpoint.id, endpoint.url, "", FAILED, failure)
    listener = listeners.get(key)
    spec = plan.specs.get(key)
    if listener is None or spec is None:
        address = join_host_port(spec.address, spec.port) if spec else ""
        client = spec.client_address if spec else ""
        return EndpointStatus(
            endpoint.id,
            endpoint.url,
            address,
            STARTING,
            "",
            client,
            mode=_mode(spec),
            addresses=(spec.address,) if spec else (),
        )
    address = join_host_port(listener.spec.address, listener.spec.port)
    stats = listener.stats
    if listener.listening:
        state, reason = LISTENING, ""
        if certificate_problem:
            reason = certificate_problem
        elif stats.last_error:
            reason = f"last connection failed: {stats.last_error}"
        else:
            reason = unnamed.get(endpoint.target.host, "")
    elif listener.error:
        state, reason = FAILED, listener.error
    else:
        state, reason = STARTING, ""
    return EndpointStatus(
        id=endpoint.id,
        url=endpoint.url,
        listen_address=address,
        state=state,
        reason=reason,
        client_address=listener.spec.client_address,
        connections_open=stats.connections_open,
        connections_total=stats.connections_total,
        errors=stats.errors,
        bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down,
        mode=_mode(listener.spec),
        addresses=(listener.spec.address,),
    )


def _with_ipv6(row: EndpointStatus, listener: ListenerState | None) -> EndpointStatus:
    """
    C{row} with its IPv6 listener's address, or why it does not listen.
    """
    if listener is None:
        return row
    if listener.error:
        return attrs.evolve(row, ipv6_error=listener.error)
    return attrs.evolve(row, addresses=(*row.addresses, listener.spec.address))


def _mode(spec: ListenSpec | None) -> str:
    if spec is None:
        return ""
    return VIRTUAL if spec.virtual else spec.address
