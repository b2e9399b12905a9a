# -*- test-case-name: ngrokd.test.test_netif -*-
"""
Virtual-mode addresses on macOS: aliases of C{lo0} in 127.0.0.0/8.

macOS answers only 127.0.0.1 locally until an address is aliased on C{lo0},
so each address is added as a host alias (C{ifconfig lo0 alias IP
255.255.255.255}) and removed with C{ifconfig lo0 -alias IP}. Nothing else
changes: the original also opened a utun and routed the configured subnet
(10.107.0.0/16) into it, which black-holed that range for the whole machine,
and its teardown would have deleted the 127/8 route (fault 28).

Aliases are not tagged, so only those added by this run are removed; the
ones a crashed run left stay until reboot, harmlessly, and are re-added (a
no-op) when their hostname comes back at the same stable address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from functools import partial
from ipaddress import IPv4Network

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface import implementer

from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.host.netif import (
    LOOPBACK_RANGE,
    INetworkInterface,
    NetworkInterfaceError,
    NotCreated,
    NotPermitted,
    SubnetNotSupported,
    check_addresses,
)

IFCONFIG = "/sbin/ifconfig"
LOOPBACK = "lo0"
#: Runs an executable with arguments; fires with (stdout, stderr, exit code).
Runner = Callable[[str, Sequence[str]], "Deferred[tuple[bytes, bytes, int]]"]

#: What ifconfig says when an alias to remove is not there (EADDRNOTAVAIL).
_NOT_THERE = b"Can't assign requested address"
_REFUSED = (b"Operation not permitted", b"Permission denied")


class CommandFailed(NetworkInterfaceError):
    """
    C{ifconfig} exited with an error.
    """


@implementer(INetworkInterface)
class DarwinInterface:
    """
    Aliases on C{lo0} for the addresses of C{subnet}, which must lie in
    127.0.0.0/8.

    @param run: runs a command (default: L{getProcessOutputAndValue} with
        C{reactor}).
    """

    def __init__(
        self, reactor: IReactorProcess, subnet: IPNetwork, run: Runner | None = None
    ) -> None:
        self._subnet = subnet
        self._run: Runner = run or partial(getProcessOutputAndValue, reactor=reactor)
        self._lock = DeferredLock()
        self._created = False
        self._added: set[IPAddress] = set()

    def create(self) -> Deferred[None]:
        if not (
            isinstance(self._subnet, IPv4Network)
            and self._subnet.subnet_of(LOOPBACK_RANGE)
        ):
            return fail(
                SubnetNotSupported(
                    f"net.subnet {self._subnet} is not inside {LOOPBACK_RANGE}: "
                    f"on macOS ngrokd's addresses are aliases of {LOOPBACK}, and "
                    f"only 127/8 is local there"
                )
            )
        self._created = True
        return succeed(None)

    def ensure_addresses(self, addresses: Set[IPAddress]) -> Deferred[None]:
        wanted = frozenset(addresses)
        try:
            if not self._created:
                raise NotCreated(f"addresses asked for before aliasing on {LOOPBACK}")
            check_addresses(wanted, self._subnet)
        except NetworkInterfaceError:
            return fail()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._ensure(wanted)))

    def addresses(self) -> Deferred[frozenset[IPAddress]]:
        """
        The aliases added by this run that are still wanted.
        """
        return succeed(frozenset(self._added))

    def destroy(self) -> Deferred[None]:
        self._created = False
        return self._lock.run(lambda: Deferred.fromCoroutine(self._ensure(frozenset())))

    def describe(self) -> str:
        return f"aliases on {LOOPBACK}" if self._created else "not created"

    def link_index(self) -> int | None:
        return None  # lo0's aliases: a loopback interface

    async def _ensure(self, wanted: frozenset[IPAddress]) -> None:
        for ip in sorted(self._added - wanted):
            await self._ifconfig(LOOPBACK, "-alias", str(ip))
            self._added.discard(ip)
        for ip in sorted(wanted - self._added):
            await self._ifconfig(LOOPBACK, "alias", str(ip), "255.255.255.255")
            self._added.add(ip)

    async def _ifconfig(self, *args: str) -> None:
        out, err, code = await self._run(IFCONFIG, args)
        if code == 0 or (args[1] == "-alias" and _NOT_THERE in err):
            return
        command = " ".join([IFCONFIG, *args])
        if any(refusal in err for refusal in _REFUSED):
            raise NotPermitted(f"run {command}")
        said = (err.strip() or out.strip()).decode("utf-8", "replace")
        raise CommandFailed(f"{command} exited with {code}: {said}")
