# -*- test-case-name: ngrokd.test.test_replan -*-
"""
A poll's decisions, made again only where the poll changed something.

Every poll lists every bound endpoint; with 10,000 of them, parsing each
URL and deciding the allocations and the plan again costs a few hundred
milliseconds of the reactor's time, though most polls change nothing.
L{Replanner} keeps the last answers: a record equal to the last poll's
keeps its parsed endpoint (the very object), and each decision (what needs
an address or a port, the allocations, the plan) is made again only when
what it is made from differs. An unchanged poll thus costs a comparison
per endpoint, and its plan is the same object as before, which the
listeners and the kept status rows (L{ngrokd.board}) see at a glance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs

from ngrokd.config import NetConfig
from ngrokd.endpoints import BoundEndpoint, EndpointURLError, parse_endpoint_url
from ngrokd.host import allocation
from ngrokd.host.allocation import (
    AllocationResult,
    Allocations,
    IPAddress,
    IPNetwork,
)
from ngrokd.names import NameRules
from ngrokd.plan import NameAddresses, Plan, plan, wanted_allocations


class Record(Protocol):
    """
    A bound endpoint as the API lists it.
    """

    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def proto(self) -> str: ...


class _Last:
    """
    One function's last answer, given again while its arguments are equal.
    """

    def __init__(self, decide: Callable[..., Any]) -> None:
        self._decide = decide
        self._given: tuple[Any, ...] | None = None
        self._answer: Any = None

    def __call__(self, *given: Any) -> Any:
        if self._given is None or self._given != given:
            self._answer = self._decide(*given)
            self._given = given
        return self._answer


def _wanted(
    endpoints: Mapping[str, BoundEndpoint],
    listen_interface: str,
    overrides: Mapping[str, str],
    names: NameRules,
) -> tuple[set[str], set[tuple[str, int]]]:
    return wanted_allocations(endpoints.values(), listen_interface, overrides, names)


def _names(
    served: Plan,
) -> tuple[dict[str, NameAddresses], dict[str, tuple[IPAddress, ...]]]:
    return served.name_addresses(), served.virtual_names()


def _plan(endpoints: Mapping[str, BoundEndpoint], *rest: Any) -> Plan:
    return plan(endpoints.values(), *rest)


class Replanner:
    """
    The last poll's parsed records and decisions.
    """

    def __init__(self) -> None:
        self._records: dict[str, tuple[Record, BoundEndpoint | str]] = {}
        self._wanted = _Last(_wanted)
        self._planned = _Last(_plan)
        self._shown = _Last(Plan.without_addresses)
        self._names = _Last(_names)
        self._allocated: (
            tuple[tuple[Any, ...], Allocations, AllocationResult] | None
        ) = None

    def parse(
        self,
        records: Iterable[Record],
        endpoints: dict[str, BoundEndpoint],
        skipped: dict[str, str],
    ) -> bool:
        """
        Add C{records} to C{endpoints}, or to C{skipped} with the reason
        when their URL cannot be served; whether any was parsed anew (not
        equal to the last poll's).
        """
        kept = self._records
        parsed = False
        for record in records:
            last = kept.get(record.id)
            if last is None or last[0] != record:
                parsed = True
                try:
                    target = parse_endpoint_url(record.url, record.proto)
                except EndpointURLError as e:
                    last = (record, str(e))
                else:
                    last = (record, BoundEndpoint(record.id, record.url, target))
                kept[record.id] = last
            if isinstance(last[1], str):
                skipped[record.id] = last[1]
            else:
                endpoints[record.id] = last[1]
        return parsed

    def parsed(self, ids: Iterable[str]) -> None:
        """
        The poll is parsed: forget the records it no longer lists.
        """
        wanted = set(ids)
        if len(wanted) != len(self._records):
            self._records = {k: v for k, v in self._records.items() if k in wanted}

    def decide(
        self,
        endpoints: Mapping[str, BoundEndpoint],
        previous: Allocations,
        net: NetConfig,
        names: NameRules,
        now: float,
        subnet6: IPNetwork | None = None,
    ) -> tuple[AllocationResult, Plan]:
        """
        What the endpoints need allocated, the allocations, and the plan:
        each decided again only when what it is made from changed. Pure:
        it may run in a thread.

        @param subnet6: the block of the names' IPv6 addresses (None: IPv6
            is off).
        """
        wanted_ips, wanted_ports = self._wanted(
            endpoints, net.listen_interface, net.overrides, names
        )
        result = self._allocate(
            previous,
            wanted_ips,
            wanted_ports,
            net.subnet,
            net.start_port,
            now,
            net.reuse_after,
            subnet6,
        )
        allocations = result.allocations
        planned: Plan = self._planned(
            endpoints,
            net.listen_interface,
            net.overrides,
            allocations.ips,
            allocations.network_ports,
            result.errors,
            names,
            allocations.ips6,
        )
        return result, planned

    def _allocate(
        self,
        previous: Allocations,
        wanted_ips: set[str],
        wanted_ports: set[tuple[str, int]],
        subnet: IPNetwork,
        start_port: int,
        now: float,
        hold: float,
        subnet6: IPNetwork | None,
    ) -> AllocationResult:
        """
        L{allocation.allocate}, decided again when its inputs changed (the
        time counts only while something given up is held back); an
        outcome equal to C{previous} keeps C{previous} itself.
        """
        held = (
            previous.released_ips or previous.released_ports or previous.released_ips6
        )
        given: tuple[Any, ...] = (
            wanted_ips,
            wanted_ports,
            subnet,
            start_port,
            hold,
            subnet6,
        )
        if held:
            given += (now,)
        last = self._allocated
        # Its own outcome, allocated again for the same wants, is the same.
        if (
            last is not None
            and last[0] == given
            and (last[1] == previous or last[2].allocations is previous)
        ):
            return last[2]
        result = allocation.allocate(
            previous, wanted_ips, wanted_ports, subnet, start_port, now, hold, subnet6
        )
        if result.allocations == previous:
            result = attrs.evolve(result, allocations=previous)
        self._allocated = (given, previous, result)
        return result

    def served(self, planned: Plan, missing: Mapping[str, str]) -> Plan:
        """
        C{planned} without the addresses of C{missing}
        (L{Plan.without_addresses}), made again when either changed.
        """
        shown: Plan = self._shown(planned, missing)
        return shown

    def names(
        self, served: Plan
    ) -> tuple[dict[str, NameAddresses], dict[str, tuple[IPAddress, ...]]]:
        """
        What the names should say of C{served}: each hostname's IPv4 and
        IPv6 addresses (L{Plan.name_addresses}), and its addresses as the
        hosts file has them (L{Plan.virtual_names}); made again when the
        plan changed.
        """
        names: tuple[dict[str, NameAddresses], dict[str, tuple[IPAddress, ...]]] = (
            self._names(served)
        )
        return names
