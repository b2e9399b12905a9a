# -*- test-case-name: ngrokd.test.test_netif_service -*-
"""
The daemon's side of the virtual interface: when it is made and removed,
and what becomes of the endpoints when it cannot be.

L{InterfaceService} owns the one-thread pool the Linux implementation runs
its netlink calls on and the L{INetworkInterface} itself: it creates it at
start when virtual mode is configured (or at the first need), hands it the
addresses each reconcile needs, and removes it on a clean stop. Calls reach
the interface one at a time, as it requires, even when a stop overlaps a
reconcile.

A missing privilege, a foreign link of the same name or an unsupported
platform never stops the daemon: L{InterfaceService.ensure} reports which
addresses are missing and why, the endpoints that need them fail with that
reason, and every other endpoint (network mode) keeps working. Creation is
tried again at each reconcile that needs an address, and each problem is
logged once, not at every poll.

IPv6 addresses are a bonus: where this machine or the link has no IPv6
(L{IPv6Unavailable}), the IPv4 addresses serve, L{InterfaceService.ipv6_error}
says why once (and for status) until IPv6 works, and no endpoint fails for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Mapping, Set
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ngrokd.config import NetConfig
from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.host.netif import (
    INetworkInterface,
    IPv6Unavailable,
    NetworkInterfaceError,
    NotPermitted,
    network_interface,
)
from ngrokd.plan import uses_virtual

_T = TypeVar("_T")

#: What still works when virtual mode does not, for the log.
NETWORK_MODE_WORKS = (
    "endpoints in network mode (net.listen_interface 0.0.0.0 or an address of"
    " this machine, or such a net.overrides entry) keep working"
)


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


class InterfaceService(Service):
    """
    The virtual-mode interface of C{net}, from start to stop.

    @ivar error: why virtual-mode addresses cannot be set up now (empty when
        they can).
    @ivar ipv6_error: why the IPv6 ones cannot (empty when they can, or
        none are wanted).
    @ivar subnet6: the IPv6 block of the addresses, if any: set before the
        service starts (it may be derived from the state directory).
    @param interface: the interface to use (tests); by default the
        platform's, made at start with this service's thread pool.
    """

    name = "interface"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        net: NetConfig,
        interface: INetworkInterface | None = None,
        platform: str = sys.platform,
    ) -> None:
        self._reactor = reactor
        self._net = net
        self._interface = interface
        self._own_interface = interface is None
        self._platform = platform
        self.threadpool = self._new_pool()
        self._lock = DeferredLock()
        self._created = False
        self.error = ""
        self.ipv6_error = ""
        self.subnet6: IPNetwork | None = None

    def describe(self) -> str:
        """
        What carries the virtual-mode addresses, or why nothing does.
        """
        if self.error:
            return f"unavailable: {self.error}"
        if self._interface is None or not self._created:
            return "not created"
        return self._interface.describe()

    def link_index(self) -> int | None:
        """
        The index of ngrokd's own link for the addresses, when it has one
        (L{INetworkInterface.link_index}).
        """
        if self.error or self._interface is None or not self._created:
            return None
        return self._interface.link_index()

    @staticmethod
    def _new_pool() -> ThreadPool:
        return ThreadPool(minthreads=0, maxthreads=1, name="ngrokd-netif")

    def startService(self) -> None:
        Service.startService(self)
        if self.threadpool.joined:
            # Started again after a stop: a stopped pool cannot restart, and
            # an interface we made is bound to it.
            self.threadpool = self._new_pool()
            if self._own_interface:
                self._interface = None
        self.threadpool.start()
        if uses_virtual(self._net.listen_interface, self._net.overrides):
            self._serially(self._create)

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        stopping = self._serially(self._destroy)
        pool = self.threadpool

        def stop_pool(result: object) -> object:
            pool.stop()
            return result

        return stopping.addBoth(stop_pool)

    def ensure(self, addresses: Set[IPAddress]) -> Deferred[Mapping[IPAddress, str]]:
        """
        Make C{addresses} exactly the virtual-mode addresses on the interface,
        creating it first if needed.

        @return: fires with the addresses that could not be set up, each
            with the reason (empty when all are there); never fails.
        """
        return self._serially(lambda: self._ensure(frozenset(addresses)))

    def _serially(self, work: Callable[[], Coroutine[Any, Any, _T]]) -> Deferred[_T]:
        return self._lock.run(lambda: Deferred.fromCoroutine(work()))

    def _make(self) -> INetworkInterface:
        if self._interface is None:
            net = self._net
            self._interface = network_interface(
                self._reactor,
                self.threadpool,
                net.interface_name,
                net.subnet,
                self._platform,
                self.subnet6,
            )
        return self._interface

    async def _create(self) -> None:
        try:
            interface = self._make()
            await interface.create()
        except Exception as e:
            self._failed(e)
            return
        self._created = True
        self.error = ""
        self.log.info(
            "virtual mode: the addresses of {subnet} are on {carrier}",
            subnet=self._net.subnet,
            carrier=interface.describe(),
        )

    def _failed(self, error: Exception) -> None:
        reason = _reason(error)
        if reason == self.error:
            return
        self.error = reason
        if not isinstance(error, NetworkInterfaceError):
            self.log.failure("setting up the virtual interface failed")
        if isinstance(error, NotPermitted):
            self.log.error(
                "virtual mode is unavailable: {error}; until ngrokd runs as root"
                " or with CAP_NET_ADMIN, virtual-mode endpoints fail and {works}",
                error=reason,
                works=NETWORK_MODE_WORKS,
            )
        else:
            self.log.error(
                "virtual mode is unavailable: {error}; virtual-mode endpoints"
                " fail and {works}",
                error=reason,
                works=NETWORK_MODE_WORKS,
            )

    async def _ensure(self, wanted: frozenset[IPAddress]) -> Mapping[IPAddress, str]:
        if not self._created:
            if not wanted:
                return {}
            await self._create()
            if not self._created:
                return dict.fromkeys(wanted, self.error)
        interface = self._make()
        try:
            await interface.ensure_addresses(wanted)
        except IPv6Unavailable as e:
            self._worked(interface)
            return self._no_ipv6(e, wanted - await self._present(interface))
        except Exception as e:
            reason = _reason(e)
            if reason != self.error:
                self.error = reason
                if not isinstance(e, NetworkInterfaceError):
                    self.log.failure("setting up the virtual-mode addresses failed")
                self.log.error(
                    "cannot set up the virtual-mode addresses: {error}", error=reason
                )
            return dict.fromkeys(wanted - await self._present(interface), reason)
        self._worked(interface)
        if self.ipv6_error and any(ip.version == 6 for ip in wanted):
            self.log.info("IPv6 works again: names have IPv6 addresses too")
            self.ipv6_error = ""
        return {}

    def _worked(self, interface: INetworkInterface) -> None:
        if self.error:
            self.log.info(
                "virtual-mode addresses work again on {carrier}",
                carrier=interface.describe(),
            )
            self.error = ""

    def _no_ipv6(
        self, error: IPv6Unavailable, missing: frozenset[IPAddress]
    ) -> Mapping[IPAddress, str]:
        """
        Say once why IPv6 is unavailable; the IPv6 addresses missing, with
        that reason.
        """
        reason = _reason(error)
        if reason != self.ipv6_error:
            self.ipv6_error = reason
            self.log.warn(
                "IPv6 is unavailable: {error}; names are served over IPv4 alone",
                error=reason,
            )
        return dict.fromkeys((ip for ip in missing if ip.version == 6), reason)

    async def _present(self, interface: INetworkInterface) -> frozenset[IPAddress]:
        """
        The addresses that are there after a failed change; none when even
        that cannot be told (the error that made us ask is logged already).
        """
        try:
            present: frozenset[IPAddress] = await interface.addresses()
        except Exception as e:
            self.log.warn(
                "cannot list the virtual-mode addresses either: {error}",
                error=_reason(e),
            )
            return frozenset()
        return present

    async def _destroy(self) -> None:
        if not self._created or self._interface is None:
            return
        self._created = False
        try:
            await self._interface.destroy()
        except Exception as e:
            left = await self._present(self._interface)
            self.log.error(
                "cannot remove the virtual-mode addresses: {error}; left on"
                " {carrier}: {addresses}",
                error=_reason(e),
                carrier=self._interface.describe(),
                addresses=", ".join(sorted(str(ip) for ip in left)) or "none known",
            )
        else:
            self.log.info("removed the virtual-mode addresses")
