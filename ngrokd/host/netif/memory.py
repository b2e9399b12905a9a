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

from ngrokd.host.allocation import IPAddress, IPNetwork
from ngrokd.host.netif import (
    AddressOutsideSubnet,
    INetworkInterface,
    NotCreated,
    check_addresses,
)


@implementer(INetworkInterface)
class MemoryInterface:
    """
    @ivar present: the addresses on the interface.
    @ivar created: whether it exists.
    @ivar failure: when set, every call fails with it (tests of error paths).
    """

    def __init__(self, subnet: IPNetwork, name: str = "ngrokd0") -> None:
        self.subnet = subnet
        self.name = name
        self.created = False
        self.present: set[IPAddress] = set()
        self.failure: Exception | None = None
        #: The link's index, as L{link_index} gives it once created.
        self.index: int | None = None

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
            check_addresses(addresses, self.subnet)
        except AddressOutsideSubnet:
            return fail()
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
