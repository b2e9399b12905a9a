"""
Tests for L{ngrokd.host.netif.service.InterfaceService}: when the interface is
made and removed, one call at a time, and what is reported when virtual mode
cannot work.
"""

from __future__ import annotations

from collections.abc import Set
from ipaddress import ip_address, ip_network
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.config import NetConfig
from ngrokd.host.netif import NetworkInterfaceError, NotPermitted
from ngrokd.host.netif.memory import MemoryInterface
from ngrokd.host.netif.service import InterfaceService
from ngrokd.test.test_netif import ImmediateReactor

SUBNET = ip_network("10.107.0.0/24")
A, B = ip_address("10.107.0.2"), ip_address("10.107.0.3")
VIRTUAL = NetConfig(
    interface_name="ngrokd0",
    subnet=SUBNET,
    listen_interface="virtual",
    start_port=9080,
    overrides={},
    hosts_file="/nonexistent/hosts",
)
NETWORK = evolve(VIRTUAL, listen_interface="0.0.0.0")


class SlowInterface(MemoryInterface):
    """
    Records each call; C{create} waits for C{created_gate} when set, and
    C{ensure_addresses} adds only C{addable} and then fails when set.
    """

    def __init__(self) -> None:
        super().__init__(SUBNET)
        self.calls: list[str] = []
        self.created_gate: Deferred[None] | None = None
        self.addable: set[Any] | None = None

    def create(self) -> Deferred[None]:
        self.calls.append("create")
        done = super().create()
        if self.created_gate is not None:
            return self.created_gate.addCallback(lambda _: done)
        return done

    def ensure_addresses(self, addresses: Set[Any]) -> Deferred[None]:
        self.calls.append("ensure")
        if self.addable is not None and not set(addresses) <= self.addable:
            self.present = set(addresses) & self.addable
            return fail(NetworkInterfaceError("the kernel said no"))
        return super().ensure_addresses(addresses)

    def destroy(self) -> Deferred[None]:
        self.calls.append("destroy")
        return super().destroy()


class InterfaceServiceTests(SynchronousTestCase):
    """
    L{InterfaceService} creates the interface, sets its addresses and
    removes it, and turns every problem into a reason per address.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def service(
        self, net: NetConfig = VIRTUAL, interface: Any = None, platform: str = "linux"
    ) -> InterfaceService:
        service = InterfaceService(ImmediateReactor(), net, interface, platform)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def logged(self, text: str) -> list[str]:
        return [m for m in map(formatEvent, self.events) if text in m]

    def test_createdAtStart(self) -> None:
        """
        With virtual mode configured the interface is made at start, and
        the log says what carries the addresses.
        """
        interface = SlowInterface()
        service = self.service(interface=interface)
        self.assertTrue(interface.created)
        self.assertEqual(service.describe(), "memory interface ngrokd0")
        self.assertEqual(
            self.logged("virtual mode:"),
            [
                "virtual mode: the addresses of 10.107.0.0/24 are on memory"
                " interface ngrokd0"
            ],
        )

    def test_ensure(self) -> None:
        """
        The addresses asked for are exactly those on the interface, and none
        is reported missing.
        """
        interface = SlowInterface()
        service = self.service(interface=interface)
        self.assertEqual(self.successResultOf(service.ensure({A, B})), {})
        self.assertEqual(self.successResultOf(service.ensure({B})), {})
        self.assertEqual(interface.present, {B})

    def test_networkModeCreatesNothing(self) -> None:
        """
        Without virtual mode nothing is made, at start or for no addresses;
        the first address asked for (an override) makes the interface.
        """
        interface = SlowInterface()
        service = self.service(NETWORK, interface)
        self.assertEqual(self.successResultOf(service.ensure(set())), {})
        self.assertEqual(interface.calls, [])
        self.assertEqual(service.describe(), "not created")
        self.assertEqual(self.successResultOf(service.ensure({A})), {})
        self.assertEqual(interface.calls, ["create", "ensure"])

    def test_removedOnStop(self) -> None:
        """
        A stop removes the interface; a second stop does nothing, and a
        restart makes it again.
        """
        interface = SlowInterface()
        service = InterfaceService(ImmediateReactor(), VIRTUAL, interface)
        service.startService()
        self.successResultOf(service.ensure({A}))
        self.successResultOf(service.stopService())
        self.successResultOf(service.stopService())
        self.assertEqual(interface.calls, ["create", "ensure", "destroy"])
        self.assertFalse(interface.created)
        self.assertTrue(service.threadpool.joined)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(interface.created)
        self.assertFalse(service.threadpool.joined)

    def test_oneCallAtATime(self) -> None:
        """
        Addresses asked for while the interface is still being made wait
        for it; so does a stop.
        """
        interface = SlowInterface()
        gate = interface.created_gate = Deferred()
        service = InterfaceService(ImmediateReactor(), VIRTUAL, interface)
        service.startService()
        ensured = service.ensure({A})
        stopped = service.stopService()
        self.assertEqual(interface.calls, ["create"])
        self.assertNoResult(ensured)
        gate.callback(None)
        self.assertEqual(self.successResultOf(ensured), {})
        self.successResultOf(stopped)
        self.assertEqual(interface.calls, ["create", "ensure", "destroy"])

    def test_noPrivilege(self) -> None:
        """
        Without the privilege to make the interface every address is
        reported missing, saying what virtual mode needs; the log says it
        once (creation is tried at each ensure) and that network mode works.
        """
        interface = SlowInterface()
        interface.failure = NotPermitted("create link ngrokd0 of kind dummy")
        service = self.service(interface=interface)
        for _ in range(2):
            missing = self.successResultOf(service.ensure({A, B}))
            self.assertEqual(set(missing), {A, B})
            self.assertIn("root or CAP_NET_ADMIN", missing[A])
        self.assertEqual(interface.calls, ["create"] * 3)
        (logged,) = self.logged("virtual mode is unavailable")
        self.assertIn("until ngrokd runs as root or with CAP_NET_ADMIN", logged)
        self.assertIn("endpoints in network mode", logged)
        self.assertIn("unavailable: cannot create link ngrokd0", service.describe())

    def test_recovers(self) -> None:
        """
        Once the interface can be made, the next ensure makes it and sets
        the addresses.
        """
        interface = SlowInterface()
        interface.failure = NotPermitted("create link ngrokd0 of kind dummy")
        service = self.service(interface=interface)
        interface.failure = None
        self.assertEqual(self.successResultOf(service.ensure({A})), {})
        self.assertEqual(interface.present, {A})
        self.assertEqual(service.error, "")

    def test_someAddressesMissing(self) -> None:
        """
        When only some addresses could be added, only those that are not
        there are reported, with the reason; the log says it once, and that
        it works again once it does.
        """
        interface = SlowInterface()
        interface.addable = {A}
        service = self.service(interface=interface)
        for _ in range(2):
            missing = self.successResultOf(service.ensure({A, B}))
            self.assertEqual(missing, {B: "the kernel said no"})
        self.assertEqual(len(self.logged("cannot set up the virtual-mode")), 1)
        interface.addable = None
        self.assertEqual(self.successResultOf(service.ensure({A, B})), {})
        self.assertEqual(len(self.logged("work again")), 1)

    def test_platformNotSupported(self) -> None:
        """
        On a platform without virtual mode the addresses are missing with
        a reason naming it.
        """
        service = self.service(platform="sunos5")
        missing = self.successResultOf(service.ensure({A}))
        self.assertIn("not supported on sunos5", missing[A])
