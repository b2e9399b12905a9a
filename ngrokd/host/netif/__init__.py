# -*- test-case-name: ngrokd.test.test_netif -*-
"""
The local addresses of virtual mode: one per endpoint hostname, on an
interface of this machine, so that a listener can bind it and the hosts file
can point the name at it.

L{INetworkInterface} is what the daemon uses; L{network_interface} picks the
implementation for the platform: L{ngrokd.host.netif.linux} (netlink),
L{ngrokd.host.netif.darwin} (loopback aliases). L{ngrokd.host.netif.memory} stands in
for both in tests.
"""

from __future__ import annotations

import sys
from collections.abc import Set
from ipaddress import IPv4Network

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorProcess
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface

from ngrokd.host.allocator import IPAddress, IPNetwork

#: Every address in it is local on Linux and macOS without any interface
#: change (on macOS, once aliased on lo0).
LOOPBACK_RANGE = IPv4Network("127.0.0.0/8")


class INetworkInterface(Interface):
    """
    An interface that carries the allocated addresses of one subnet.

    Calls are made one at a time: C{create}, then C{ensure_addresses} as often
    as the allocations change, then C{destroy} on a clean stop.
    """

    def create() -> Deferred[None]:
        """
        Make the interface ready, adopting what an earlier run that did not
        stop cleanly left behind. Calling it again does no harm.

        @raise NetworkInterfaceError: a subclass saying what is wrong.
        """

    def ensure_addresses(addresses: Set[IPAddress]) -> Deferred[None]:  # noqa: N805
        """
        Make C{addresses} exactly the subnet addresses ngrokd has on the
        interface: add the missing ones and remove those ngrokd added that are
        no longer wanted. On a shared interface (such as C{lo}), addresses
        others added are left alone; a link of ngrokd's own holds only
        ngrokd's.

        @raise AddressOutsideSubnet: if one of them is not in the subnet.
        @raise NotCreated: before L{create} or after L{destroy}.
        """

    def addresses() -> Deferred[frozenset[IPAddress]]:
        """
        The subnet addresses ngrokd has on the interface now (none before
        C{create}).
        """

    def destroy() -> Deferred[None]:
        """
        Remove what C{create} and C{ensure_addresses} set up.
        """

    def describe() -> str:
        """
        What carries the addresses (which link, or why none is needed), for
        logs and C{ngrokctl status}.
        """

    def link_index() -> int | None:
        """
        The index of the link of ngrokd's own that carries the addresses,
        once created: what systemd-resolved is told to send our domains to.
        C{None} when they are on a shared or loopback interface, or on none.
        """


class NetworkInterfaceError(Exception):
    """
    The interface or its addresses could not be set up.
    """


class NotPermitted(NetworkInterfaceError):
    """
    The operating system refused: virtual mode changes network interfaces.
    """

    def __init__(self, action: str) -> None:
        super().__init__(
            f"cannot {action}: virtual mode needs root or CAP_NET_ADMIN "
            f"(or set net.listen_interface to 0.0.0.0 or an address)"
        )


class ForeignLink(NetworkInterfaceError):
    """
    A link with the configured name exists and is not one ngrokd made.
    """

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(
            f"a network link named {name} already exists and is {kind}, not one "
            f"ngrokd creates; set net.interface_name to another name, or "
            f"remove that link"
        )
        self.name = name
        self.kind = kind


class AddressOutsideSubnet(NetworkInterfaceError):
    """
    An address asked for is not in the configured subnet.
    """


class NotCreated(NetworkInterfaceError):
    """
    Addresses were asked for before C{create} (or after C{destroy}).
    """


class SubnetNotSupported(NetworkInterfaceError):
    """
    The platform cannot carry addresses of the configured subnet.
    """


class IPv6Unavailable(NetworkInterfaceError):
    """
    The IPv6 addresses asked for could not be added because this machine,
    or the link, has no IPv6 (a kernel without it, C{disable_ipv6}); the
    IPv4 ones were.
    """


class PlatformNotSupported(NetworkInterfaceError):
    """
    Virtual mode is not implemented on this operating system.
    """


def check_addresses(
    addresses: Set[IPAddress], subnet: IPNetwork, subnet6: IPNetwork | None = None
) -> None:
    """
    @raise AddressOutsideSubnet: naming the addresses in neither C{subnet}
        nor C{subnet6}.
    """
    outside = sorted(
        str(ip)
        for ip in addresses
        if ip not in subnet and (subnet6 is None or ip not in subnet6)
    )
    if outside:
        also = "" if subnet6 is None else f" nor net.subnet6 {subnet6}"
        raise AddressOutsideSubnet(
            f"{', '.join(outside)} not in net.subnet {subnet}{also}"
        )


def network_interface(
    reactor: IReactorFromThreads,
    threadpool: ThreadPool,
    interface_name: str,
    subnet: IPNetwork,
    platform: str = sys.platform,
    subnet6: IPNetwork | None = None,
) -> INetworkInterface:
    """
    The implementation for C{platform} (a C{sys.platform} value).

    @param threadpool: a one-thread pool the caller starts and stops; Linux
        runs its netlink calls there, off the reactor thread.
    @param subnet6: the IPv6 block whose addresses the interface carries
        too (Linux; macOS virtual mode is IPv4 only).
    @raise PlatformNotSupported: on a platform without one.
    """
    if platform.startswith("linux"):
        from ngrokd.host.netif.linux import LinuxInterface

        return LinuxInterface(
            reactor, threadpool, interface_name, subnet, subnet6=subnet6
        )
    if platform == "darwin":
        from ngrokd.host.netif.darwin import DarwinInterface

        return DarwinInterface(IReactorProcess(reactor), subnet)
    raise PlatformNotSupported(
        f"virtual mode is not supported on {platform}; set "
        f"net.listen_interface to 0.0.0.0 or an address"
    )
