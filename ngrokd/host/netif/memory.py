# -*- test-case-name: ngrokd.test.test_netif -*-
"""
An interface in memory, for tests of what uses one: it behaves like the
real ones (the same test suite runs against both) and changes nothing on
the machine.
"""

from __future__ import annotations

from collections.abc import Set

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.host.netif import (
    AddressOutsideSubnet,
    INetworkInterface,
    IPv6Unavailable,
    NotCreated,
    check_addresses,
)


@implementer(INetworkInterface)
class MemoryInterface:
    """
    @ivar present: the addresses on the interface.
    @ivar created: whether it exists.
    @ivar failure: when set, every call fails with it (tests of error paths).
    @ivar no_ipv6: when set, why IPv6 addresses cannot be added (a machine
        without IPv6): the IPv4 ones are, then it is raised.
    """

    def __init__(
        self,
        subnet: IPNetwork,
        name: str = "ngrokd0",
        subnet6: IPNetwork | None = None,
    ) -> None:
        self.subnet = subnet
        self.subnet6 = subnet6
        self.name = name
        self.created = False
        self.present: set[IPAddress] = set()
        self.failure: Exception | None = None
        #: The link's index, as L{link_index} gives it once created.
        self.index: int | None = None
        self.no_ipv6: str = ""

    def create(self) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        self.created = True
        return succeed(None)

    def ensure_addresses(self, addresses: Set[IPAddress]) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        if not self.created:
            return fail(
                NotCreated(f"addresses asked for before {self.name} was created")
            )
        try:
            check_addresses(addresses, self.subnet, self.subnet6)
        except AddressOutsideSubnet:
            return fail()
        if self.no_ipv6:
            self.present = {ip for ip in addresses if ip in self.subnet}
            if len(self.present) < len(addresses):
                return fail(IPv6Unavailable(self.no_ipv6))
            return succeed(None)
        self.present = set(addresses)
        return succeed(None)

    def addresses(self) -> Deferred[frozenset[IPAddress]]:
        if self.failure is not None:
            return fail(self.failure)
        return succeed(frozenset(self.present))

    def destroy(self) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        self.created = False
        self.present.clear()
        return succeed(None)

    def describe(self) -> str:
        return f"memory interface {self.name}" if self.created else "not created"

    def link_index(self) -> int | None:
        return self.index if self.created else None
