# -*- test-case-name: ngrokd.test.test_netif -*-
"""
Virtual-mode addresses on Linux, through netlink (pyroute2).

The addresses go on a link of ngrokd's own, so that they are easy to tell
from everyone else's: a dummy link where the kernel has them; else a
bridge, which holds local addresses just like a dummy link; else C{lo}
itself, where ngrokd's addresses are tagged with their own address protocol
number. A link left by a run that did not stop
cleanly is adopted; a link of that name of any other kind is refused.

Each address is a host address (/32 or /128), of C{net.subnet} or of
C{net.subnet6}. The original added them with
the subnet's prefix (C{10.107.0.2/16}), which routes the whole subnet to the
link and so hijacks it when a LAN or VPN uses it; on C{lo} it would make
every address of the subnet local. IPv6 addresses skip duplicate address
detection, so they can be bound at once. Where the kernel or the link has
no IPv6 (C{ipv6.disable=1}, C{disable_ipv6}), the IPv4 addresses are set up
all the same and L{IPv6Unavailable} says why the IPv6 ones are not.

A bridge has a carrier only while one of its ports has one, and
systemd-resolved gives a link without a carrier no DNS scope; so the bridge
gets one port of its own, one end of a veth pair whose other end is up and
attached to nothing: the bridge forwards nothing to anyone, and keeps its
carrier.

A subnet inside 127.0.0.0/8 needs no change at all: Linux treats every
address of 127/8 as local.

Netlink calls block, so they run in the one thread of a pool the caller owns
and starts; after construction, only that thread touches this object's
state, and every call opens its own netlink socket there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Set
from ipaddress import IPv4Network, ip_address
from typing import Any

from attrs import frozen
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ngrokd.host.allocator import IPAddress, IPNetwork
from ngrokd.host.netif import (
    LOOPBACK_RANGE,
    ForeignLink,
    INetworkInterface,
    IPv6Unavailable,
    NetworkInterfaceError,
    NotCreated,
    NotPermitted,
    check_addresses,
)

#: Link kinds to create, in order of preference.
LINK_KINDS = ("dummy", "bridge")
LOOPBACK = "lo"
#: The address protocol (C{IFA_PROTO}, Linux 6.1 and later) that marks the
#: addresses ngrokd adds, so that those it left on C{lo} can be found again.
#: Values 0 to 3 are the kernel's; this one is "n".
ADDRESS_PROTOCOL = 0x6E
_IFA_F_NODAD = 0x02
#: What adding an IPv6 address fails with where there is no IPv6: the
#: link's C{disable_ipv6} (EACCES), a kernel without it (EAFNOSUPPORT).
_NO_IPV6 = (errno.EACCES, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EOPNOTSUPP)


#: The longest link name the kernel takes (C{IFNAMSIZ} less its NUL).
_MAX_NAME = 15


def carrier_pair(name: str) -> tuple[str, str]:
    """
    The names of the veth pair that gives bridge C{name} its carrier: the
    end in the bridge, and its peer.
    """
    base = name[: _MAX_NAME - 3]
    return f"{base}-c0", f"{base}-c1"


class NetlinkFailed(NetworkInterfaceError):
    """
    The kernel refused a netlink request for another reason than permission.
    """


@frozen
class _Carrier:
    """
    Where the addresses are: the link C{index} named C{name}, or nowhere
    (C{index} is C{None}) when the subnet is local already. On a link of
    ngrokd's own (C{whole}) every subnet address is ngrokd's.
    """

    index: int | None
    name: str
    whole: bool
    description: str


_NO_LINK = _Carrier(
    None, "", False, "no link: every address of 127.0.0.0/8 is local on Linux"
)


@implementer(INetworkInterface)
class LinuxInterface:
    """
    The addresses of C{subnet}, and of C{subnet6} when given, on the link
    C{interface_name} (or on C{lo}).

    @param link_kinds: the link kinds to try, in order, before falling back to
        C{lo}.
    @param netlink: makes a pyroute2 C{IPRoute} (for tests: one in another
        network namespace).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        interface_name: str,
        subnet: IPNetwork,
        link_kinds: tuple[str, ...] = LINK_KINDS,
        netlink: Callable[[], Any] = IPRoute,
        subnet6: IPNetwork | None = None,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._name = interface_name
        self._subnet = subnet
        self._subnet6 = subnet6
        self._kinds = link_kinds
        self._netlink = netlink
        self._carrier: _Carrier | None = None
        #: Addresses added to C{lo} by this run, in case the kernel dropped
        #: their protocol number.
        self._added: set[IPAddress] = set()
        self._description = "not created"
        #: Why the last L{_ensure} added no IPv6 address, if so.
        self._no_ipv6: IPv6Unavailable | None = None

    def create(self) -> Deferred[None]:
        return self._run(self._create)

    def ensure_addresses(self, addresses: Set[IPAddress]) -> Deferred[None]:
        wanted = frozenset(addresses)
        try:
            check_addresses(wanted, self._subnet, self._subnet6)
        except NetworkInterfaceError:
            return fail()
        return self._run(self._ensure, wanted).addCallback(self._ipv6_added)

    def _ipv6_added(self, _: None) -> None:
        """
        Fail with why the IPv6 addresses of the last L{_ensure} could not be
        added, if they could not (the IPv4 ones were).
        """
        if self._no_ipv6 is not None:
            raise self._no_ipv6

    def addresses(self) -> Deferred[frozenset[IPAddress]]:
        return deferToThreadPool(self._reactor, self._threadpool, self._addresses)

    def destroy(self) -> Deferred[None]:
        return self._run(self._destroy)

    def describe(self) -> str:
        return self._description

    def link_index(self) -> int | None:
        carrier = self._carrier
        return carrier.index if carrier is not None and carrier.whole else None

    def _run(self, work: Callable[..., str | None], *args: object) -> Deferred[None]:
        """
        Run C{work} in the pool's thread and log the notice it returns, here
        in the reactor thread.
        """
        d = deferToThreadPool(self._reactor, self._threadpool, work, *args)

        def log(notice: str | None) -> None:
            if notice is not None:
                self.log.info("virtual addresses: {notice}", notice=notice)

        return d.addCallback(log)

    # Everything below runs in the pool's thread.

    def _use(self, carrier: _Carrier | None) -> None:
        self._carrier = carrier
        self._description = "not created" if carrier is None else carrier.description

    def _create(self) -> None:
        # What is used is told by describe(); the service logs it once.
        if isinstance(self._subnet, IPv4Network) and self._subnet.subnet_of(
            LOOPBACK_RANGE
        ):
            self._use(_NO_LINK)
            return
        with self._netlink() as ipr:
            carrier = self._carrier
            if carrier is not None and self._index(ipr, carrier.name) == carrier.index:
                return
            self._use(self._find_or_make(ipr))

    def _index(self, ipr: Any, name: str | None = None) -> int | None:
        found = ipr.link_lookup(ifname=name or self._name)
        return found[0] if found else None

    def _find_or_make(self, ipr: Any) -> _Carrier:
        existing = self._index(ipr)
        if existing is not None:
            return self._adopt(ipr, existing)
        missing: list[str] = []
        for kind in self._kinds:
            try:
                ipr.link("add", ifname=self._name, kind=kind)
            except NetlinkError as e:
                if e.code == errno.EOPNOTSUPP:
                    missing.append(kind)
                    continue
                raise _error(e, f"create link {self._name} of kind {kind}") from e
            index = self._index(ipr)
            assert index is not None
            self._bring_up(ipr, index, remove_on_failure=True)
            description = (
                f"link {self._name} ({kind}{self._with_carrier(ipr, kind, index)})"
            )
            if missing:
                description += f"; this kernel has no {' or '.join(missing)} links"
            return _Carrier(index, self._name, True, description)
        index = self._index(ipr, LOOPBACK)
        assert index is not None
        return _Carrier(
            index,
            LOOPBACK,
            False,
            f"addresses on {LOOPBACK}; this kernel has no {' or '.join(missing)} links",
        )

    def _adopt(self, ipr: Any, index: int) -> _Carrier:
        kind = _kind(ipr, index)
        if kind not in self._kinds:
            raise ForeignLink(
                self._name,
                f"a {kind} link" if kind else "a device without a link kind",
            )
        ports = [
            other.get_attr("IFLA_IFNAME")
            for other in ipr.get_links()
            if other.get_attr("IFLA_MASTER") == index
            and other.get_attr("IFLA_IFNAME") != carrier_pair(self._name)[0]
        ]
        if ports:
            raise ForeignLink(
                self._name, f"a {kind} with ports ({', '.join(sorted(ports))})"
            )
        self._bring_up(ipr, index, remove_on_failure=False)
        return _Carrier(
            index,
            self._name,
            True,
            f"link {self._name} ({kind}{self._with_carrier(ipr, kind, index)}),"
            " adopted from an earlier run",
        )

    def _with_carrier(self, ipr: Any, kind: str, index: int) -> str:
        """
        Give a bridge its carrier (a veth pair's end as its port, both ends
        up), and say how it went for the description.
        """
        if kind != "bridge":
            return ""
        port, peer = carrier_pair(self._name)
        existing = self._index(ipr, port)
        if existing is not None and _kind(ipr, existing) != "veth":
            return f", without a carrier: {port} is not a veth link"
        try:
            if existing is None:
                ipr.link("add", ifname=port, kind="veth", peer=peer)
            ipr.link("set", index=self._index(ipr, port), master=index, state="up")
            ipr.link("set", index=self._index(ipr, peer), state="up")
        except NetlinkError as e:
            self._remove_carrier(ipr)
            why = os.strerror(e.code)
            return f", without a carrier: cannot add veth pair {port}: {why}"
        return f", its carrier from veth pair {port}"

    def _remove_carrier(self, ipr: Any) -> None:
        port = self._index(ipr, carrier_pair(self._name)[0])
        if port is None or _kind(ipr, port) != "veth":
            return
        try:
            ipr.link("del", index=port)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _error(e, f"remove link {carrier_pair(self._name)[0]}") from e

    def _bring_up(self, ipr: Any, index: int, remove_on_failure: bool) -> None:
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            error = _error(e, f"bring link {self._name} up")
            if remove_on_failure:
                try:
                    ipr.link("del", index=index)
                except NetlinkError as second:
                    raise NetlinkFailed(
                        f"{error}; removing that new link failed too: "
                        f"{os.strerror(second.code)}"
                    ) from e
            raise error from e

    def _require(self) -> _Carrier:
        if self._carrier is None:
            raise NotCreated(f"addresses asked for before {self._name} was created")
        return self._carrier

    def _ensure(self, wanted: frozenset[IPAddress]) -> str | None:
        self._no_ipv6 = None
        carrier = self._require()
        if carrier.index is None:
            if any(ip not in self._subnet for ip in wanted):
                self._no_ipv6 = IPv6Unavailable(
                    f"net.subnet {self._subnet} is in {LOOPBACK_RANGE}, which"
                    " needs no link, and IPv6 addresses need one: set net.subnet"
                    " outside it for IPv6"
                )
            return None
        notice = None
        with self._netlink() as ipr:
            if self._index(ipr, carrier.name) != carrier.index:
                self._use(self._find_or_make(ipr))
                carrier = self._require()
                notice = f"{self._name} had disappeared; now on {carrier.description}"
            assert carrier.index is not None
            present = list(self._ours(ipr, carrier))
            for ip, prefixlen in present:
                if ip not in wanted or prefixlen != ip.max_prefixlen:
                    self._remove(ipr, carrier, ip, prefixlen)
            have = {ip for ip, prefixlen in present if prefixlen == ip.max_prefixlen}
            no_ipv6: IPv6Unavailable | None = None
            for ip in sorted(wanted - have, key=lambda ip: (ip.version, ip)):
                if ip.version == 6 and no_ipv6 is not None:
                    continue
                try:
                    self._add(ipr, carrier, ip)
                except IPv6Unavailable as e:
                    no_ipv6 = e
        self._no_ipv6 = no_ipv6
        return notice

    def _ours(self, ipr: Any, carrier: _Carrier) -> Iterator[tuple[IPAddress, int]]:
        """
        ngrokd's subnet addresses on C{carrier}, with their prefix length.
        """
        for message in ipr.get_addr(index=carrier.index):
            local = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            ip = ip_address(local)
            if ip not in self._subnet and (
                self._subnet6 is None or ip not in self._subnet6
            ):
                continue
            if (
                carrier.whole
                or message.get_attr("IFA_PROTO") == ADDRESS_PROTOCOL
                or ip in self._added
            ):
                yield ip, message["prefixlen"]

    def _add(self, ipr: Any, carrier: _Carrier, ip: IPAddress) -> None:
        options: dict[str, Any] = {"proto": ADDRESS_PROTOCOL}
        if ip.version == 6:
            options["flags"] = _IFA_F_NODAD
        try:
            ipr.addr(
                "add",
                index=carrier.index,
                address=str(ip),
                prefixlen=ip.max_prefixlen,
                **options,
            )
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return
            if ip.version == 6 and e.code in _NO_IPV6 and ip not in self._subnet:
                raise IPv6Unavailable(
                    f"cannot add {ip} to {carrier.name}: {os.strerror(e.code)}"
                    f"{_no_ipv6_hint(e.code, carrier.name)}"
                ) from e
            raise _error(e, f"add {ip} to {carrier.name}") from e
        if not carrier.whole:
            self._added.add(ip)

    def _remove(
        self, ipr: Any, carrier: _Carrier, ip: IPAddress, prefixlen: int
    ) -> None:
        try:
            ipr.addr("del", index=carrier.index, address=str(ip), prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:
                raise _error(e, f"remove {ip}/{prefixlen} from {carrier.name}") from e
        self._added.discard(ip)

    def _addresses(self) -> frozenset[IPAddress]:
        carrier = self._carrier
        if carrier is None or carrier.index is None:
            return frozenset()
        with self._netlink() as ipr:
            if self._index(ipr, carrier.name) != carrier.index:
                return frozenset()
            return frozenset(
                ip
                for ip, prefixlen in self._ours(ipr, carrier)
                if prefixlen == ip.max_prefixlen
            )

    def _destroy(self) -> None:
        carrier = self._carrier
        if carrier is None or carrier.index is None:
            self._use(None)
            return
        with self._netlink() as ipr:
            if self._index(ipr, carrier.name) == carrier.index:
                if carrier.whole:
                    self._remove_carrier(ipr)
                    try:
                        ipr.link("del", index=carrier.index)
                    except NetlinkError as e:
                        if e.code != errno.ENODEV:
                            raise _error(e, f"remove link {carrier.name}") from e
                else:
                    for ip, prefixlen in list(self._ours(ipr, carrier)):
                        self._remove(ipr, carrier, ip, prefixlen)
        self._use(None)
        self._added.clear()


def _no_ipv6_hint(code: int, link: str) -> str:
    if code == errno.EACCES:
        return (
            f" (IPv6 is disabled on {link}: sysctl net.ipv6.conf.{link}.disable_ipv6)"
        )
    if code == errno.EAFNOSUPPORT:
        return " (this kernel has no IPv6)"
    return ""


def _kind(ipr: Any, index: int) -> str | None:
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _error(e: NetlinkError, action: str) -> NetworkInterfaceError:
    if e.code in (errno.EPERM, errno.EACCES):
        return NotPermitted(action)
    return NetlinkFailed(f"cannot {action}: {os.strerror(e.code)}")
