"""
Tests for L{ngrokd.host.netif}: one suite for every implementation (in memory,
Linux netlink in a throwaway namespace, macOS with a simulated ifconfig),
plus what is particular to each.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from ipaddress import ip_address, ip_network
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ngrokd.host.netif import (
    AddressOutsideSubnet,
    ForeignLink,
    INetworkInterface,
    IPv6Unavailable,
    NotCreated,
    NotPermitted,
    PlatformNotSupported,
    SubnetNotSupported,
    network_interface,
)
from ngrokd.host.netif.darwin import IFCONFIG, CommandFailed, DarwinInterface
from ngrokd.host.netif.memory import MemoryInterface
from ngrokd.test.namespace import Namespace, namespace, run_in_namespace

SUBNET4 = ip_network("10.107.0.0/16")
SUBNET6 = ip_network("fd00:6e67::/64")
LOOPBACK = ip_network("127.0.0.0/8")


def ip(text: str) -> Any:
    return ip_address(text)


class SynchronousThreadPool(ThreadPool):
    """
    Runs work at once, in the calling thread.
    """

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


@implementer(IReactorFromThreads)
class ImmediateReactor:
    """
    Runs what a thread hands over at once.
    """

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        callable(*args, **kwargs)


if TYPE_CHECKING:
    _TestCase = SynchronousTestCase
else:
    _TestCase = object


class NetworkInterfaceTestsMixin(_TestCase):
    """
    The behaviour every L{INetworkInterface} shares. Subclasses say how to
    make one and how to see, independently of it, which addresses it set up.
    """

    subnet: Any = SUBNET4
    subnet6: Any = SUBNET6

    def make_interface(self, subnet) -> Any:
        raise NotImplementedError()

    def observed(self, interface) -> set:
        """
        The subnet's host addresses that are really there.
        """
        raise NotImplementedError()

    def address(self, n: int, subnet=None) -> Any:
        subnet = subnet or self.subnet
        return subnet.network_address + n

    def created(self, subnet=None) -> Any:
        interface = self.make_interface(subnet or self.subnet)
        self.successResultOf(interface.create())
        return interface

    def test_provides(self) -> None:
        """
        The implementation provides L{INetworkInterface}.
        """
        self.assertTrue(
            verifyObject(INetworkInterface, self.make_interface(self.subnet))
        )

    def test_ensureAddresses(self) -> None:
        """
        After create(), ensure_addresses() puts exactly those addresses on the
        interface, and addresses() reports them.
        """
        interface = self.created()
        wanted = {self.address(2), self.address(3)}
        self.successResultOf(interface.ensure_addresses(wanted))
        self.assertEqual(self.observed(interface), wanted)
        self.assertEqual(self.successResultOf(interface.addresses()), wanted)

    def test_unwantedRemoved(self) -> None:
        """
        Addresses no longer wanted are removed, new ones added, the others
        left.
        """
        interface = self.created()
        self.successResultOf(
            interface.ensure_addresses({self.address(2), self.address(3)})
        )
        self.successResultOf(
            interface.ensure_addresses({self.address(3), self.address(4)})
        )
        self.assertEqual(self.observed(interface), {self.address(3), self.address(4)})
        self.successResultOf(interface.ensure_addresses(set()))
        self.assertEqual(self.observed(interface), set())

    def test_createAgain(self) -> None:
        """
        A second create() keeps what is there.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.successResultOf(interface.create())
        self.assertEqual(self.observed(interface), {self.address(2)})

    def test_outsideSubnet(self) -> None:
        """
        An address outside the subnet is refused with an error naming it and
        the subnet, and nothing changes.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        stranger = ip("192.0.2.7")
        failure = self.failureResultOf(
            interface.ensure_addresses({self.address(3), stranger}),
            AddressOutsideSubnet,
        )
        self.assertIn("192.0.2.7", str(failure.value))
        self.assertIn(str(self.subnet), str(failure.value))
        self.assertEqual(self.observed(interface), {self.address(2)})

    def test_notCreated(self) -> None:
        """
        Addresses asked for before create() are refused, and addresses()
        reports none.
        """
        interface = self.make_interface(self.subnet)
        self.failureResultOf(interface.ensure_addresses({self.address(2)}), NotCreated)
        self.assertEqual(self.successResultOf(interface.addresses()), frozenset())

    def test_destroy(self) -> None:
        """
        destroy() removes the addresses; afterwards the interface must be
        created again before it takes addresses.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.successResultOf(interface.destroy())
        self.assertEqual(self.observed(interface), set())
        self.assertEqual(self.successResultOf(interface.addresses()), frozenset())
        self.failureResultOf(interface.ensure_addresses({self.address(2)}), NotCreated)
        self.successResultOf(interface.create())
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.assertEqual(self.observed(interface), {self.address(2)})

    def test_describe(self) -> None:
        """
        describe() says when nothing is set up, and otherwise what is used.
        """
        interface = self.make_interface(self.subnet)
        self.assertEqual(interface.describe(), "not created")
        self.successResultOf(interface.create())
        self.assertNotEqual(interface.describe(), "not created")

    def test_ipv6(self) -> None:
        """
        An IPv6 subnet's addresses work the same way.
        """
        if self.subnet6 is None:
            raise SkipTest("this implementation has no IPv6 subnets")
        interface = self.created(self.subnet6)
        wanted = {self.address(2, self.subnet6), self.address(3, self.subnet6)}
        self.successResultOf(interface.ensure_addresses(wanted))
        self.assertEqual(self.observed(interface), wanted)


class MemoryInterfaceTests(NetworkInterfaceTestsMixin, SynchronousTestCase):
    """
    The interface suite on L{MemoryInterface}.
    """

    def make_interface(self, subnet):
        return MemoryInterface(subnet)

    def observed(self, interface):
        return interface.present

    def test_failure(self) -> None:
        """
        With C{failure} set, every call fails with it.
        """
        interface = MemoryInterface(SUBNET4)
        interface.failure = NotPermitted("create link ngrokd0")
        for d in (
            interface.create(),
            interface.ensure_addresses(set()),
            interface.addresses(),
            interface.destroy(),
        ):
            self.assertIs(
                self.failureResultOf(d, NotPermitted).value, interface.failure
            )


class FakeIfconfig:
    """
    C{ifconfig lo0 alias/-alias} on a simulated lo0, recording every command.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[str, ...]]] = []
        self.aliases: set = set()
        self.answer: tuple[bytes, bytes, int] | None = None

    def __call__(self, executable: str, args: Sequence[str]) -> Deferred:
        self.commands.append((executable, tuple(args)))
        if self.answer is not None:
            return succeed(self.answer)
        if args[1] == "alias":
            self.aliases.add(ip(args[2]))
        elif ip(args[2]) in self.aliases:
            self.aliases.discard(ip(args[2]))
        else:
            return succeed(
                (
                    b"",
                    b"ifconfig: ioctl (SIOCDIFADDR): Can't assign requested address\n",
                    1,
                )
            )
        return succeed((b"", b"", 0))


class DarwinInterfaceTests(NetworkInterfaceTestsMixin, SynchronousTestCase):
    """
    The interface suite on L{DarwinInterface}, with a simulated ifconfig, and
    the exact commands it runs.
    """

    subnet = LOOPBACK
    subnet6 = None

    def setUp(self) -> None:
        self.ifconfig = FakeIfconfig()

    def make_interface(self, subnet):
        return DarwinInterface(reactor, subnet, run=self.ifconfig)

    def observed(self, interface):
        return self.ifconfig.aliases

    def test_commands(self) -> None:
        """
        Addresses are added as host aliases of lo0 and removed with -alias,
        and nothing else is run (no utun, no route).
        """
        interface = self.created()
        self.successResultOf(
            interface.ensure_addresses({ip("127.0.0.3"), ip("127.0.0.2")})
        )
        self.successResultOf(interface.ensure_addresses({ip("127.0.0.3")}))
        self.successResultOf(interface.destroy())
        self.assertEqual(
            self.ifconfig.commands,
            [
                (IFCONFIG, ("lo0", "alias", "127.0.0.2", "255.255.255.255")),
                (IFCONFIG, ("lo0", "alias", "127.0.0.3", "255.255.255.255")),
                (IFCONFIG, ("lo0", "-alias", "127.0.0.2")),
                (IFCONFIG, ("lo0", "-alias", "127.0.0.3")),
            ],
        )

    def test_refusesOtherSubnets(self) -> None:
        """
        A subnet outside 127.0.0.0/8 is refused with an error naming it, and
        nothing is run.
        """
        interface = self.make_interface(SUBNET4)
        failure = self.failureResultOf(interface.create(), SubnetNotSupported)
        self.assertIn("10.107.0.0/16", str(failure.value))
        self.assertEqual(self.ifconfig.commands, [])

    def test_commandFails(self) -> None:
        """
        A failing ifconfig is reported with the command and what it said;
        the address is tried again next time.
        """
        interface = self.created()
        self.ifconfig.answer = (b"", b"ifconfig: something broke\n", 1)
        failure = self.failureResultOf(
            interface.ensure_addresses({ip("127.0.0.2")}), CommandFailed
        )
        self.assertIn(
            "/sbin/ifconfig lo0 alias 127.0.0.2 255.255.255.255 exited with 1: "
            "ifconfig: something broke",
            str(failure.value),
        )
        self.ifconfig.answer = None
        self.successResultOf(interface.ensure_addresses({ip("127.0.0.2")}))
        self.assertEqual(self.ifconfig.aliases, {ip("127.0.0.2")})

    def test_notPermitted(self) -> None:
        """
        Without root, the error says that virtual mode needs it.
        """
        interface = self.created()
        self.ifconfig.answer = (
            b"",
            b"ifconfig: ioctl (SIOCAIFADDR): Operation not permitted\n",
            1,
        )
        failure = self.failureResultOf(
            interface.ensure_addresses({ip("127.0.0.2")}), NotPermitted
        )
        self.assertIn("root", str(failure.value))

    def test_aliasAlreadyGone(self) -> None:
        """
        An alias someone else removed is not an error when ngrokd removes it.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({ip("127.0.0.2")}))
        self.ifconfig.aliases.clear()
        self.successResultOf(interface.ensure_addresses(set()))


class FactoryTests(SynchronousTestCase):
    """
    L{network_interface} picks the platform's implementation.
    """

    def test_platforms(self) -> None:
        """
        Linux gets netlink, macOS loopback aliases, others an error.
        """
        from ngrokd.host.netif.linux import LinuxInterface

        pool = ThreadPool(1, 1)
        threads = IReactorFromThreads(reactor)
        made = network_interface(threads, pool, "ngrokd0", SUBNET4, platform="linux")
        self.assertIsInstance(made, LinuxInterface)
        made = network_interface(threads, pool, "ngrokd0", LOOPBACK, platform="darwin")
        self.assertIsInstance(made, DarwinInterface)
        self.assertRaises(
            PlatformNotSupported,
            network_interface,
            threads,
            pool,
            "ngrokd0",
            SUBNET4,
            platform="win32",
        )


def ip_json(ns: Namespace, *argv: str) -> Any:
    result = ns.run(["ip", "-j", *argv])
    if result.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)} failed: {result.stderr}")
    return json.loads(result.stdout or "[]")


def addresses_by_link(ns: Namespace, subnet) -> dict[str, set[str]]:
    """
    The subnet's addresses in the namespace, as C{ip/prefix} by link name.
    """
    found: dict[str, set[str]] = {}
    for link in ip_json(ns, "addr", "show"):
        for info in link.get("addr_info", []):
            if ip(info["local"]) in subnet:
                found.setdefault(link["ifname"], set()).add(
                    f"{info['local']}/{info['prefixlen']}"
                )
    return found


def link_kinds(ns: Namespace) -> dict[str, str | None]:
    return {
        link["ifname"]: link.get("linkinfo", {}).get("info_kind")
        for link in ip_json(ns, "-d", "link", "show")
    }


def must(ns: Namespace, *argv: str) -> None:
    result = ns.run(argv)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {result.stderr}")


class LinuxNamespaceMixin(_TestCase):
    """
    A L{LinuxInterface} on a throwaway network namespace.
    """

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("netlink is Linux-only")
        self.ns = namespace(self)

    def make_interface(
        self, subnet, link_kinds=None, pool=None, reactor=None, subnet6=None
    ):
        from pyroute2 import IPRoute

        from ngrokd.host.netif.linux import LINK_KINDS, LinuxInterface

        return LinuxInterface(
            reactor or ImmediateReactor(),
            pool or SynchronousThreadPool(),
            "ngrokd0",
            subnet,
            link_kinds=link_kinds or LINK_KINDS,
            netlink=partial(IPRoute, netns=self.ns.net_path),
            subnet6=subnet6,
        )


class LinuxInterfaceTests(
    LinuxNamespaceMixin, NetworkInterfaceTestsMixin, SynchronousTestCase
):
    """
    The interface suite on L{LinuxInterface}, with real netlink in a
    namespace, and the Linux specifics: link kinds and their fallbacks,
    leftovers, foreign links, privileges.
    """

    def observed(self, interface):
        return {
            ip(text.split("/")[0])
            for texts in addresses_by_link(self.ns, interface._subnet).values()
            for text in texts
            if text.endswith(("/32", "/128"))
        }

    def test_hostAddressesOnOwnLink(self) -> None:
        """
        The addresses are host addresses (/32, /128) on a link named
        ngrokd0 of the first kind this kernel has; no route for the subnet
        appears. describe() names the link and its kind.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        kind = link_kinds(self.ns)["ngrokd0"]
        self.assertIn(kind, ("dummy", "bridge"))
        self.assertIn(f"ngrokd0 ({kind}", interface.describe())
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4), {"ngrokd0": {"10.107.0.2/32"}}
        )
        self.assertEqual(
            [r for r in ip_json(self.ns, "route", "show") if "10.107" in r["dst"]], []
        )

    def test_fallbackToBridge(self) -> None:
        """
        When the kernel lacks a link kind the next one is used, and
        describe() says which is missing.
        """
        interface = self.make_interface(SUBNET4, link_kinds=("nosuchkind", "bridge"))
        self.successResultOf(interface.create())
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.assertEqual(link_kinds(self.ns)["ngrokd0"], "bridge")
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4), {"ngrokd0": {"10.107.0.2/32"}}
        )
        self.assertIn("ngrokd0 (bridge", interface.describe())
        self.assertIn("no nosuchkind links", interface.describe())

    def carriers(self) -> dict[str, int]:
        """
        Each link's carrier, as the kernel reports it (C{IFLA_CARRIER}).
        """
        from pyroute2 import IPRoute

        with IPRoute(netns=self.ns.net_path) as ipr:
            return {
                link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_CARRIER")
                for link in ipr.get_links()
            }

    def test_bridgeHasCarrier(self) -> None:
        """
        The bridge gets a carrier (which systemd-resolved requires of a link
        before it sends it queries) from a veth pair of its own: it keeps it
        after another port came and went, when an empty bridge's carrier
        follows its ports (none: on this machine's kernel a new empty bridge
        reports one until then), and when taken down and up; describe() says
        so; the veth pair goes with the link.
        """
        interface = self.make_interface(SUBNET4, link_kinds=("bridge",))
        self.successResultOf(interface.create())
        self.assertIn(
            "(bridge, its carrier from veth pair ngrokd0-c0)", interface.describe()
        )
        must(self.ns, "ip", "link", "add", "other0", "type", "veth", "peer", "other1")
        must(self.ns, "ip", "link", "set", "other0", "master", "ngrokd0")
        must(self.ns, "ip", "link", "del", "other0")
        must(self.ns, "ip", "link", "set", "ngrokd0", "down")
        must(self.ns, "ip", "link", "set", "ngrokd0", "up")
        self.assertEqual(self.carriers()["ngrokd0"], 1)
        ports = ip_json(self.ns, "link", "show", "master", "ngrokd0")
        self.assertEqual([p["ifname"] for p in ports], ["ngrokd0-c0"])
        self.successResultOf(interface.destroy())
        self.assertEqual(list(link_kinds(self.ns)), ["lo"])

    def test_carrierNamesFit(self) -> None:
        """
        With a link name of the kernel's longest (15 characters), the veth
        pair's names are cut to fit.
        """
        from pyroute2 import IPRoute

        from ngrokd.host.netif.linux import LinuxInterface, carrier_pair

        self.assertEqual(
            carrier_pair("ngrokd-fifteen1"), ("ngrokd-fifte-c0", "ngrokd-fifte-c1")
        )
        interface = LinuxInterface(
            ImmediateReactor(),
            SynchronousThreadPool(),
            "ngrokd-fifteen1",
            SUBNET4,
            link_kinds=("bridge",),
            netlink=partial(IPRoute, netns=self.ns.net_path),
        )
        self.successResultOf(interface.create())
        self.assertEqual(self.carriers()["ngrokd-fifteen1"], 1)
        self.assertEqual(link_kinds(self.ns)["ngrokd-fifte-c0"], "veth")

    def test_adoptsBridgeWithItsCarrier(self) -> None:
        """
        A bridge an earlier run left, with its own veth port, is adopted (that
        port is not someone else's) and keeps its carrier.
        """
        self.successResultOf(
            self.make_interface(SUBNET4, link_kinds=("bridge",)).create()
        )
        interface = self.make_interface(SUBNET4, link_kinds=("bridge",))
        self.successResultOf(interface.create())
        self.assertIn("adopted", interface.describe())
        self.assertEqual(self.carriers()["ngrokd0"], 1)
        self.assertEqual(
            sorted(link_kinds(self.ns)), ["lo", "ngrokd0", "ngrokd0-c0", "ngrokd0-c1"]
        )

    def test_fallbackToLoopback(self) -> None:
        """
        When no link kind works, the addresses go on lo as host addresses;
        destroy() removes them and only them.
        """
        must(self.ns, "ip", "addr", "add", "10.107.9.9/32", "dev", "lo")
        interface = self.make_interface(SUBNET4, link_kinds=("nosuchkind",))
        self.successResultOf(interface.create())
        self.successResultOf(
            interface.ensure_addresses({self.address(2), self.address(3)})
        )
        self.assertNotIn("ngrokd0", link_kinds(self.ns))
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4),
            {"lo": {"10.107.0.2/32", "10.107.0.3/32", "10.107.9.9/32"}},
        )
        self.assertIn("addresses on lo", interface.describe())
        self.assertEqual(
            self.successResultOf(interface.addresses()),
            {self.address(2), self.address(3)},
        )
        self.successResultOf(interface.destroy())
        self.assertEqual(addresses_by_link(self.ns, SUBNET4), {"lo": {"10.107.9.9/32"}})

    def test_loopbackLeftoversFound(self) -> None:
        """
        On lo, the addresses an earlier run left are recognised by their
        protocol number and removed when not wanted; others' are kept.
        """
        must(self.ns, "ip", "addr", "add", "10.107.9.9/32", "dev", "lo")
        earlier = self.make_interface(SUBNET4, link_kinds=("nosuchkind",))
        self.successResultOf(earlier.create())
        self.successResultOf(
            earlier.ensure_addresses({self.address(2), self.address(3)})
        )
        interface = self.make_interface(SUBNET4, link_kinds=("nosuchkind",))
        self.successResultOf(interface.create())
        self.successResultOf(interface.ensure_addresses({self.address(3)}))
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4),
            {"lo": {"10.107.0.3/32", "10.107.9.9/32"}},
        )

    def test_adoptsLeftoverLink(self) -> None:
        """
        A link of ngrokd's kind left by an earlier run (here one like the Go
        original's, with subnet-wide prefixes) is adopted: its subnet
        addresses become exactly the wanted host addresses, so the
        subnet-wide route goes; addresses outside the subnet stay.
        """
        must(self.ns, "ip", "link", "add", "ngrokd0", "type", "bridge")
        for address in (
            "10.107.0.1/16",
            "10.107.0.2/16",
            "10.107.0.5/32",
            "192.0.2.1/24",
        ):
            must(self.ns, "ip", "addr", "add", address, "dev", "ngrokd0")
        interface = self.make_interface(SUBNET4, link_kinds=("dummy", "bridge"))
        self.successResultOf(interface.create())
        self.assertIn("adopted", interface.describe())
        self.successResultOf(
            interface.ensure_addresses({self.address(2), self.address(3)})
        )
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4),
            {"ngrokd0": {"10.107.0.2/32", "10.107.0.3/32"}},
        )
        self.assertEqual(
            addresses_by_link(self.ns, ip_network("192.0.2.0/24")),
            {"ngrokd0": {"192.0.2.1/24"}},
        )
        self.assertEqual(
            [
                r["dst"]
                for r in ip_json(self.ns, "route", "show")
                if "10.107" in r["dst"]
            ],
            [],
        )

    def test_refusesForeignLink(self) -> None:
        """
        A link with the name that is of another kind is refused with an error
        naming it and its kind, and left alone.
        """
        must(
            self.ns,
            "ip",
            "link",
            "add",
            "ngrokd0",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        )
        interface = self.make_interface(SUBNET4)
        failure = self.failureResultOf(interface.create(), ForeignLink)
        self.assertIn("ngrokd0", str(failure.value))
        self.assertIn("veth", str(failure.value))
        self.assertEqual(link_kinds(self.ns)["ngrokd0"], "veth")

    def test_refusesBridgeWithPorts(self) -> None:
        """
        A bridge of that name with ports is someone's real bridge: refused.
        """
        must(self.ns, "ip", "link", "add", "ngrokd0", "type", "bridge")
        must(
            self.ns,
            "ip",
            "link",
            "add",
            "port0",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        )
        must(self.ns, "ip", "link", "set", "port0", "master", "ngrokd0")
        interface = self.make_interface(SUBNET4, link_kinds=("dummy", "bridge"))
        failure = self.failureResultOf(interface.create(), ForeignLink)
        self.assertIn("port0", str(failure.value))

    def test_destroyRemovesLink(self) -> None:
        """
        destroy() removes the link it made.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.successResultOf(interface.destroy())
        self.assertEqual(list(link_kinds(self.ns)), ["lo"])

    def test_linkRecreated(self) -> None:
        """
        When someone deletes the link, the next ensure_addresses() makes it
        again.
        """
        interface = self.created()
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        must(self.ns, "ip", "link", "del", "ngrokd0")
        self.successResultOf(interface.ensure_addresses({self.address(2)}))
        self.assertEqual(
            addresses_by_link(self.ns, SUBNET4), {"ngrokd0": {"10.107.0.2/32"}}
        )

    def test_loopbackRangeNeedsNoLink(self) -> None:
        """
        For a subnet inside 127.0.0.0/8 nothing is created or added: the
        addresses work as they are.
        """
        interface = self.created(LOOPBACK)
        self.successResultOf(interface.ensure_addresses({ip("127.0.0.2")}))
        self.assertEqual(list(link_kinds(self.ns)), ["lo"])
        self.assertIn("127.0.0.0/8", interface.describe())
        self.assertEqual(self.ns.run_python(_ECHO % ("127.0.0.2", 2)), "ping")

    def test_addressesReachable(self) -> None:
        """
        A server can bind an address at once (IPv6 too: no duplicate address
        detection delay) and a client reach it.
        """
        for subnet in (SUBNET4, SUBNET6):
            interface = self.created(subnet)
            self.successResultOf(interface.ensure_addresses({self.address(2, subnet)}))
            family = 2 if subnet.version == 4 else 10
            self.assertEqual(
                self.ns.run_python(_ECHO % (str(self.address(2, subnet)), family)),
                "ping",
            )
            self.successResultOf(interface.destroy())

    def test_ipv6BesideIPv4(self) -> None:
        """
        With net.subnet6, IPv6 host addresses go on the link beside the
        IPv4 ones, without duplicate address detection (so bound and
        reached at once); addresses no longer wanted go, of either family.
        """
        interface = self.make_interface(SUBNET4, subnet6=SUBNET6)
        self.successResultOf(interface.create())
        v4, v6 = self.address(2), self.address(2, SUBNET6)
        self.successResultOf(interface.ensure_addresses({v4, v6}))
        carrier = "ngrokd0" if "ngrokd0" in link_kinds(self.ns) else "lo"
        self.assertEqual(addresses_by_link(self.ns, SUBNET6), {carrier: {f"{v6}/128"}})
        self.assertEqual(addresses_by_link(self.ns, SUBNET4), {carrier: {f"{v4}/32"}})
        (link,) = ip_json(self.ns, "addr", "show", "dev", carrier)
        flags = [a for a in link["addr_info"] if a["local"] == str(v6)]
        self.assertEqual(len(flags), 1)
        self.assertTrue(flags[0].get("nodad"), flags)
        self.assertFalse(flags[0].get("tentative"), flags)
        self.assertEqual(self.ns.run_python(_ECHO % (str(v6), 10)), "ping")
        self.assertEqual(self.successResultOf(interface.addresses()), {v4, v6})
        self.successResultOf(interface.ensure_addresses({v4}))
        self.assertEqual(addresses_by_link(self.ns, SUBNET6), {})
        self.assertEqual(addresses_by_link(self.ns, SUBNET4), {carrier: {f"{v4}/32"}})

    def test_ipv6Disabled(self) -> None:
        """
        Where IPv6 is disabled (disable_ipv6 for every link), the IPv4
        addresses are added all the same, and L{IPv6Unavailable} says the
        IPv6 ones could not be, and why.
        """
        must(self.ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        must(self.ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        interface = self.make_interface(SUBNET4, subnet6=SUBNET6)
        self.successResultOf(interface.create())
        v4, v6 = self.address(2), self.address(2, SUBNET6)
        failure = self.failureResultOf(
            interface.ensure_addresses({v4, v6}), IPv6Unavailable
        )
        self.assertIn(f"cannot add {v6} to ", str(failure.value))
        self.assertIn("disable_ipv6", str(failure.value))
        carrier = "ngrokd0" if "ngrokd0" in link_kinds(self.ns) else "lo"
        self.assertEqual(addresses_by_link(self.ns, SUBNET4), {carrier: {f"{v4}/32"}})
        self.assertEqual(self.ns.run_python(_ECHO % (str(v4), 2)), "ping")
        self.successResultOf(interface.ensure_addresses({v4}))

    def test_ipv6OnLoopbackSubnet(self) -> None:
        """
        A net.subnet inside 127.0.0.0/8 has no link for IPv6 addresses:
        the IPv4 ones work, and L{IPv6Unavailable} says why.
        """
        interface = self.make_interface(LOOPBACK, subnet6=SUBNET6)
        self.successResultOf(interface.create())
        failure = self.failureResultOf(
            interface.ensure_addresses({ip("127.0.0.2"), self.address(2, SUBNET6)}),
            IPv6Unavailable,
        )
        self.assertIn("127.0.0.0/8", str(failure.value))
        self.successResultOf(interface.ensure_addresses({ip("127.0.0.2")}))

    def test_notPermitted(self) -> None:
        """
        Without CAP_NET_ADMIN, create() says that virtual mode needs root or
        CAP_NET_ADMIN.
        """
        result = self.ns.run(
            [
                "setpriv",
                "--bounding-set=-net_admin",
                "--inh-caps=-net_admin",
                sys.executable,
                "-c",
                _UNPRIVILEGED,
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        kind, message = json.loads(result.stdout)
        self.assertEqual(kind, "NotPermitted")
        self.assertIn("root or CAP_NET_ADMIN", message)
        self.assertEqual(list(link_kinds(self.ns)), ["lo"])


#: Serve one connection on (address, family) and say what came through.
_ECHO = """
import json, socket
address, family = %r, %d
server = socket.socket(family, socket.SOCK_STREAM)
server.bind((address, 8080))
server.listen(1)
client = socket.create_connection((address, 8080), timeout=5)
client.sendall(b"ping")
accepted, _ = server.accept()
print(json.dumps(accepted.recv(4).decode()))
"""

_UNPRIVILEGED = """
import json
from ipaddress import ip_network
from ngrokd.host.netif.linux import LinuxInterface
from ngrokd.test.test_netif import ImmediateReactor, SynchronousThreadPool
interface = LinuxInterface(
    ImmediateReactor(), SynchronousThreadPool(), "ngrokd0", ip_network("10.107.0.0/16"))
failures = []
interface.create().addErrback(failures.append)
print(json.dumps([type(failures[0].value).__name__, str(failures[0].value)]))
"""


class LinuxThreadTests(LinuxNamespaceMixin, TestCase):
    """
    L{LinuxInterface} with a real thread pool and reactor.
    """

    async def test_offTheReactorThread(self) -> None:
        """
        Netlink work runs in the pool's thread and its results come back to
        the reactor.
        """
        from twisted.internet import reactor

        pool = ThreadPool(1, 1, "ngrokd-netif-test")
        pool.start()
        self.addCleanup(pool.stop)
        interface = self.make_interface(SUBNET4, pool=pool, reactor=reactor)
        await interface.create()
        await interface.ensure_addresses({SUBNET4.network_address + 2})
        self.assertEqual(await interface.addresses(), {SUBNET4.network_address + 2})
        await interface.destroy()
        self.assertEqual(list(link_kinds(self.ns)), ["lo"])


class NamespaceHelperTests(SynchronousTestCase):
    """
    The namespace helper isolates tests from this machine.
    """

    def test_isolated(self) -> None:
        """
        A command in a namespace sees only an up lo, and what it writes to
        /etc does not reach this machine's /etc.
        """
        namespace(self)
        probe = "/etc/ngrokd-namespace-probe"
        self.assertFalse(os.path.exists(probe))
        result = run_in_namespace(["sh", "-c", f"touch {probe} && ip -j link show"])
        self.assertEqual(result.returncode, 0, result.stderr)
        links = json.loads(result.stdout)
        self.assertEqual([link["ifname"] for link in links], ["lo"])
        self.assertIn("UP", links[0]["flags"])
        self.assertFalse(os.path.exists(probe))
