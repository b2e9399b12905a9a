"""
Tests for L{ngrokd.host.nameservice}: the pure decisions (the mode, where
the server listens, the table, the hosts file's share), then the service
with the bus, the sockets and C{getaddrinfo} faked: the order of its steps,
the check and the fallback, resolved leaving and coming back, the stop.
The real resolved and real lookups are L{ngrokd.test.test_names_e2e}'s.
"""

from __future__ import annotations

import os
import socket
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Any, cast

import attrs
from jeepney import HeaderFields
from twisted.internet.address import IPv4Address as UDPAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.testing import EventLoggingObserver, _FakePort
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ngrokd.config import Config, DnsConfig, default_config
from ngrokd.dns.zones import normalise
from ngrokd.host.allocator import IPNetwork
from ngrokd.host.dbus import DBusConnection, Disconnected, ErrorReply
from ngrokd.host.dnsserver import find_upstreams
from ngrokd.host.namechoice import (
    HOSTS,
    RESOLVED,
    RESOLVER_FILES,
    choose_mode,
    hosts_names,
    names_table,
    own_address,
    server_listen,
    server_listen6,
)
from ngrokd.host.nameservice import NameService
from ngrokd.host.registration import FilesRegistration
from ngrokd.host.resolverfiles import MARK, FilesResult
from ngrokd.test.resolvedns import SETUP
from ngrokd.test.test_hosts import ThreadReactor

SERVER = IPv4Address("10.107.0.1")
APPS = IPv4Address("10.107.0.2")
WEB = IPv4Address("10.107.0.3")
WEB6 = IPv6Address("fd00::3")
NAMES = {"*.apps.prod": ((APPS,), ()), "web.prod": ((WEB,), (WEB6,))}


def config(**dns: Any) -> Config:
    base = default_config("/etc/ngrokd/config.yml", {}, "linux").config
    return attrs.evolve(base, dns=DnsConfig(**dns))


class DecisionTests(SynchronousTestCase):
    """
    The pure decisions.
    """

    def test_mode(self) -> None:
        """
        C{auto} is resolved when it runs (Linux), /etc/resolver on macOS,
        else the hosts file; any other mode is itself.
        """
        self.assertEqual(
            [
                choose_mode("auto", "linux", True),
                choose_mode("auto", "linux", False),
                choose_mode("auto", "darwin", False),
                choose_mode("auto", "freebsd14", True),
                choose_mode("hosts", "linux", True),
                choose_mode("resolved", "linux", False),
                choose_mode("resolver-files", "linux", True),
            ],
            [RESOLVED, HOSTS, RESOLVER_FILES, HOSTS, HOSTS, RESOLVED, RESOLVER_FILES],
        )

    def test_listen(self) -> None:
        """
        In virtual mode the server listens on the subnet's first host, port
        53, which the daemon puts on its link; in network mode nowhere
        unless dns.listen says; never with mode off. An address outside the
        subnet, and loopback's own, are not the daemon's to add.
        """
        virtual = config()
        network = attrs.evolve(
            virtual, net=attrs.evolve(virtual.net, listen_interface="0.0.0.0")
        )
        self.assertEqual(server_listen(virtual.dns, virtual.net), ("10.107.0.1", 53))
        self.assertIsNone(server_listen(network.dns, network.net))
        self.assertEqual(
            server_listen(DnsConfig(listen="[::1]:5353"), network.net), ("::1", 5353)
        )
        self.assertIsNone(server_listen(DnsConfig(mode="off"), virtual.net))
        net = virtual.net
        self.assertEqual(own_address(("10.107.0.1", 53), net), SERVER)
        self.assertIsNone(own_address(("192.0.2.1", 53), net))
        self.assertIsNone(own_address(None, net))
        darwin = attrs.evolve(net, subnet=ip_network("127.0.0.0/8"))
        self.assertIsNone(own_address(("127.0.0.1", 53), darwin))

    def test_listen6(self) -> None:
        """
        In virtual mode with an IPv6 block, the server listens on that
        block's first host too (the names' start at its second); not with
        an explicit C{dns.listen}, without the block, in network mode or
        with C{dns.mode: off}.
        """
        virtual = config()
        net = virtual.net
        subnet6 = ip_network("fd00:1::/64")
        self.assertEqual(server_listen6(virtual.dns, net, subnet6), ("fd00:1::1", 53))
        self.assertIsNone(server_listen6(virtual.dns, net, None))
        explicit = DnsConfig(listen="10.107.0.1:53")
        self.assertIsNone(server_listen6(explicit, net, subnet6))
        self.assertIsNone(server_listen6(DnsConfig(mode="off"), net, subnet6))
        network = attrs.evolve(net, listen_interface="0.0.0.0")
        self.assertIsNone(server_listen6(virtual.dns, network, subnet6))

    def test_hostsNames(self) -> None:
        """
        With DNS serving the system the hosts file holds nothing; otherwise
        every name but the wildcards, which a hosts line cannot say.
        """
        names = {"*.apps.prod": "10.107.0.2", "web.prod": "10.107.0.3"}
        self.assertEqual(hosts_names(names, True), {})
        self.assertEqual(hosts_names(names, False), {"web.prod": "10.107.0.3"})

    def test_table(self) -> None:
        """
        The table holds every name with its IPv4 and IPv6 addresses, the
        wildcard answering for every name under it, and the probe name
        with the server's own address.
        """
        table = names_table(NAMES, "ngrokd-probe-x.web.prod", SERVER)
        self.assertEqual(table.addresses("web.prod"), (WEB, WEB6))
        self.assertEqual(table.addresses(normalise("A.B.apps.prod.")), (APPS,))
        self.assertEqual(table.addresses("ngrokd-probe-x.web.prod"), (SERVER,))
        self.assertIsNone(table.addresses("apps.prod"))
        self.assertEqual(table.zones, frozenset({"apps.prod", "web.prod"}))
        self.assertIsNone(
            names_table(NAMES, None, SERVER).addresses("ngrokd-probe-x.web.prod")
        )


class Bus:
    """
    Stands in for the D-Bus connection: answers each call at once from
    C{answers} (by member; an exception fails it), and records it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.signal: Any = None
        self.closed = False
        self.answers: dict[str, Any] = {
            "NameHasOwner": (True,),
            "Get": (("a(iiayqs)", [(0, 2, bytes([192, 0, 2, 53]), 53, "")]),),
        }

    def call(self, message: Any, timeout: float = 10.0) -> Deferred[Any]:
        member = message.header.fields[HeaderFields.member]
        self.calls.append((member, message.body))
        answer = self.answers.get(member, ())
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def subscribe(self, rule: Any, callback: Any) -> Deferred[None]:
        self.signal = callback
        return succeed(None)

    def when_lost(self) -> Deferred[str]:
        self.lost: Deferred[str] = Deferred()
        return self.lost

    def close(self) -> Deferred[str]:
        self.closed = True
        self.lost.callback("closed")
        return succeed("closed")

    def members(self) -> list[str]:
        return [member for member, _ in self.calls]


class Link:
    """
    ngrokd's link, as the interface service describes it.
    """

    index: int | None = 7
    subnet6: IPNetwork | None = None

    def link_index(self) -> int | None:
        return self.index

    def describe(self) -> str:
        return "addresses on lo; this kernel has no dummy or bridge links"


@implementer(IReactorUDP)
class SocketReactor(ThreadReactor):
    """
    A memory reactor that also takes UDP listens, on the port asked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[str, int]] = []
        #: Hosts that cannot be listened on (their address is not here).
        self.absent: set[str] = set()

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        if interface in self.absent:
            raise CannotListenError(interface, port, OSError(99, "not available"))
        self.udp.append((interface, port))
        return _FakePort(UDPAddress("UDP", interface, port))


class ServiceFixture(SynchronousTestCase):
    """
    A name service on fakes: C{lookups} are the names looked up, answered
    with C{answer} (an exception: raised).
    """

    mode = "resolved"

    def setUp(self) -> None:
        self.reactor = SocketReactor()
        self.bus = Bus()
        #: When set, connecting to the bus fails with it.
        self.bus_error: Exception | None = None
        self.link = Link()
        self.lookups: list[str] = []
        self.answer: Any = [str(SERVER)]
        self.logged = EventLoggingObserver()
        globalLogPublisher.addObserver(self.logged)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged)
        self.changes = 0
        self.service = self.make(config(mode=self.mode))

    def make(self, configuration: Config, **kw: Any) -> NameService:
        service = NameService(
            self.reactor,
            configuration,
            self.link,
            platform="linux",
            bus=self.connect,
            resolv_confs=(),
            lookup=self.lookup,
            **kw,
        )
        service.changed = self.changed
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def connect(self) -> Deferred[DBusConnection]:
        if self.bus_error is not None:
            return fail(self.bus_error)
        return succeed(cast(DBusConnection, self.bus))

    def changed(self) -> None:
        self.changes += 1

    def lookup(self, name: str, *args: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(name)
        if isinstance(self.answer, Exception):
            raise self.answer
        return [(socket.AF_INET, 1, 6, "", (a, 0)) for a in self.answer]

    def apply(self, names: Any = NAMES) -> None:
        self.successResultOf(self.service.apply(names))

    def warnings(self, text: str) -> list[str]:
        return [
            e["reason"]
            for e in self.logged
            if "reason" in e and text in e.get("log_format", "")
        ]


class ResolvedServiceTests(ServiceFixture):
    """
    The server registered with systemd-resolved.
    """

    def test_registered(self) -> None:
        """
        The server listens on the link's address, forwards to resolved's
        own servers, answers our names; our link gets the routing domains,
        default-route off, LLMNR and mDNS off, then the server; the probe
        name resolves to the server, so the hosts file holds nothing.
        """
        self.apply()
        self.assertEqual(self.reactor.udp, [("10.107.0.1", 53)])
        self.assertEqual(self.bus.members(), ["NameHasOwner", "Get", *SETUP])
        self.assertEqual(
            self.bus.calls[2][1], (7, [("apps.prod", True), ("web.prod", True)])
        )
        server = self.service._server
        assert server is not None
        self.assertEqual(server.upstreams.servers, (("192.0.2.53", 53),))
        self.assertEqual(server.server.table.addresses("x.apps.prod"), (APPS,))
        (probe,) = self.lookups
        self.assertTrue(probe.startswith("ngrokd-probe-"), probe)
        self.assertTrue(probe.endswith(".apps.prod"), probe)
        self.assertEqual(self.service.hosts_names(NAMES), {})
        status = self.service.status()
        self.assertEqual(
            (status.via, status.fallback, status.dns_serves),
            ("systemd-resolved; DNS server on 10.107.0.1:53", "", True),
        )
        self.assertEqual(self.service.unnamed(list(NAMES)), {})

    def test_ipv6(self) -> None:
        """
        With an IPv6 block, the server also listens on its first host, the
        daemon puts that address on the link too, and resolved is given
        both servers.
        """
        self.link.subnet6 = ip_network("fd00:1::/64")
        self.assertEqual(
            self.service.own_addresses(), {SERVER, IPv6Address("fd00:1::1")}
        )
        self.apply()
        self.assertEqual(self.reactor.udp, [("10.107.0.1", 53), ("fd00:1::1", 53)])
        (dns,) = [body for member, body in self.bus.calls if member == "SetLinkDNS"]
        self.assertEqual(
            dns,
            (
                7,
                [
                    (socket.AF_INET, SERVER.packed),
                    (socket.AF_INET6, IPv6Address("fd00:1::1").packed),
                ],
            ),
        )
        self.assertIn("[fd00:1::1]:53", self.service.status().via)

    def test_noIPv6(self) -> None:
        """
        When the IPv6 address cannot be listened on, the server serves and
        is registered over IPv4 alone, said once; once it can, resolved is
        given both.
        """
        self.link.subnet6 = ip_network("fd00:1::/64")
        self.reactor.absent.add("fd00:1::1")
        self.apply()
        self.apply({**NAMES, "api.prod": ((WEB,), ())})
        self.assertEqual(self.reactor.udp, [("10.107.0.1", 53)])
        dns = [body for member, body in self.bus.calls if member == "SetLinkDNS"]
        self.assertEqual(dns, [(7, [(socket.AF_INET, SERVER.packed)])] * 2)
        warned = [e for e in self.logged if "serves over IPv4 alone" in e["log_format"]]
        self.assertEqual(len(warned), 1)
        self.assertTrue(self.service.status().dns_serves)
        self.reactor.absent.clear()
        self.apply()
        self.assertEqual(self.reactor.udp[-1], ("fd00:1::1", 53))
        self.assertEqual(len(dns), 2)
        dns = [body for member, body in self.bus.calls if member == "SetLinkDNS"]
        self.assertEqual(len(dns[-1][1]), 2)

    def test_unchangedNotAgain(self) -> None:
        """
        The same names again change nothing with resolved, and are not
        checked again; a new name sends the new domains and checks again.
        """
        self.apply()
        calls = len(self.bus.calls)
        self.apply()
        self.assertEqual((len(self.bus.calls), len(self.lookups)), (calls, 1))
        self.apply({**NAMES, "db.prod": ((IPv4Address("10.107.0.4"),), ())})
        self.assertEqual(self.bus.members()[calls], "SetLinkDomains")
        self.assertEqual(len(self.lookups), 2)

    def test_namesGone(self) -> None:
        """
        When the last name goes, its domains go from our link too, and the
        server answers none of them.
        """
        self.apply()
        del self.bus.calls[:]
        self.apply({})
        self.assertEqual(self.bus.calls[0], ("SetLinkDomains", (7, [])))
        server = self.service._server
        assert server is not None
        self.assertIsNone(server.server.table.addresses("web.prod"))

    def test_checkFails(self) -> None:
        """
        When the system does not ask our server, the names (but the
        wildcard) go to the hosts file, the reason is in status and said
        once; the wildcard is said not to be reachable by name. The check
        is made again after a while, and once it passes the hosts file
        empties.
        """
        self.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.apply()
        self.apply()
        self.assertEqual(
            self.service.hosts_names(NAMES), {"web.prod": ((WEB,), (WEB6,))}
        )
        status = self.service.status()
        self.assertFalse(status.dns_serves)
        self.assertIn("systemd-resolved does not send our names", status.fallback)
        self.assertIn("Name or service not known", status.fallback)
        self.assertEqual(status.via, "the hosts file; DNS server on 10.107.0.1:53")
        self.assertEqual(self.warnings("hosts file"), [status.fallback])
        self.assertIn(
            "a hosts file cannot hold a wildcard",
            self.service.unnamed(list(NAMES))["*.apps.prod"],
        )
        self.answer = [str(SERVER)]
        self.reactor.advance(60)
        self.apply()
        self.assertEqual(self.service.hosts_names(NAMES), {})

    def test_resolvedComesAndGoes(self) -> None:
        """
        resolved leaving sends the names to the hosts file at once (the
        daemon is told); its return applies our settings again, checks,
        and sends them back to DNS.
        """
        self.apply()
        self.bus.signal(("org.freedesktop.resolve1", ":1.4", ""))
        self.assertEqual(self.service.status().fallback, "systemd-resolved stopped")
        self.assertEqual(self.changes, 1)
        self.assertEqual(
            self.service.hosts_names(NAMES), {"web.prod": NAMES["web.prod"]}
        )
        del self.bus.calls[:]
        self.bus.signal(("org.freedesktop.resolve1", "", ":1.5"))
        self.assertEqual(self.bus.members()[0], "SetLinkDomains")
        self.assertEqual(len(self.lookups), 2)
        self.assertEqual(self.changes, 2)
        self.assertEqual(self.service.hosts_names(NAMES), {})

    def test_busLost(self) -> None:
        """
        The bus connection lost: the hosts file at once (the daemon is
        told); the next apply connects and registers again.
        """
        self.apply()
        lost = self.bus
        self.bus = Bus()
        lost.lost.callback("the bus closed the connection: gone")
        self.assertEqual(
            self.service.status().fallback,
            "lost the system bus: the bus closed the connection: gone",
        )
        self.assertEqual(self.changes, 1)
        self.apply()
        self.assertEqual(self.bus.members(), SETUP)
        self.assertIsNotNone(self.bus.signal)
        self.assertEqual(self.service.hosts_names(NAMES), {})

    def test_notRunning(self) -> None:
        """
        resolved not running: the names are in the hosts file, and why.
        """
        self.bus.answers["SetLinkDomains"] = ErrorReply(
            "SetLinkDomains", "org.freedesktop.DBus.Error.NameHasNoOwner", ""
        )
        self.apply()
        self.assertEqual(
            self.service.status().fallback,
            "link 7: systemd-resolved is not running",
        )
        self.assertEqual(self.lookups, [])

    def test_noLinkOfOurOwn(self) -> None:
        """
        Addresses on lo (no dummy or bridge links) give resolved no link to
        send our domains to: said, with what carries the addresses.
        """
        self.link.index = None
        self.apply()
        self.assertIn(
            "ngrokd has no link of its own here (addresses on lo",
            self.service.status().fallback,
        )
        self.assertNotIn("SetLinkDomains", self.bus.members())

    def test_stop(self) -> None:
        """
        A stop reverts the link, closes the bus and stops the server.
        """
        self.apply()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.bus.members()[-1], "RevertLink")
        self.assertTrue(self.bus.closed)
        self.assertIsNone(self.service.counters())

    def test_reconfigured(self) -> None:
        """
        A new mode undoes the registration; the next apply sets the new one
        up.
        """
        self.apply()
        self.service.reconfigure(config(mode="hosts"))
        self.apply()
        self.assertEqual(self.bus.members()[-1], "RevertLink")
        self.assertEqual(self.reactor.udp, [("10.107.0.1", 53)] * 2)
        self.assertEqual(
            self.service.status().via, "the hosts file; DNS server on 10.107.0.1:53"
        )
        self.assertEqual(
            self.service.hosts_names(NAMES), {"web.prod": NAMES["web.prod"]}
        )


class AutoTests(ServiceFixture):
    """
    C{dns.mode: auto} on Linux.
    """

    mode = "auto"

    def test_noBus(self) -> None:
        """
        No system bus: the hosts file for the system, and the server for
        those who ask it; never a lookup.
        """
        self.bus_error = Disconnected("D-Bus at /run/x: refused")
        self.apply()
        status = self.service.status()
        self.assertEqual(
            status.via,
            "the hosts file (dns.mode auto: no system bus: D-Bus at /run/x: refused);"
            " DNS server on 10.107.0.1:53",
        )
        self.assertEqual((status.fallback, status.strict), ("", False))
        self.assertEqual(self.lookups, [])

    def test_resolvedNotRunning(self) -> None:
        """
        A bus without resolved: the hosts file, saying why.
        """
        self.bus.answers["NameHasOwner"] = (False,)
        self.apply()
        self.assertIn(
            "dns.mode auto: systemd-resolved is not running", self.service.status().via
        )
        self.assertEqual(self.bus.members(), ["NameHasOwner"])


class OffTests(ServiceFixture):
    """
    C{dns.mode: off}.
    """

    mode = "off"

    def test_nothing(self) -> None:
        """
        No server, no address for it, the hosts file for every name.
        """
        self.apply()
        self.assertEqual((self.reactor.udp, self.bus.calls), ([], []))
        self.assertEqual(self.service.own_addresses(), frozenset())
        self.assertEqual(
            self.service.hosts_names(NAMES), {"web.prod": NAMES["web.prod"]}
        )


class ResolverFilesTests(ServiceFixture):
    """
    C{dns.mode: resolver-files}, in a directory of the test's.
    """

    mode = "resolver-files"

    def setUp(self) -> None:
        super().setUp()
        self.directory = os.path.abspath(self.mktemp())
        self.flushes: list[str] = []
        self.service = self.make(
            config(mode="resolver-files"),
            resolver_directory=self.directory,
            flush=self.flush,
        )

    def flush(self, executable: str, args: Any) -> Deferred[Any]:
        self.flushes.append(executable)
        return succeed((b"", b"", 0))

    def test_files(self) -> None:
        """
        One file per routed domain sends it to the server; the cache is
        flushed; the check passes; a stop removes the files.
        """
        self.apply()
        self.assertEqual(sorted(os.listdir(self.directory)), ["apps.prod", "web.prod"])
        with open(os.path.join(self.directory, "web.prod"), "rb") as f:
            self.assertEqual(f.read(), MARK + b"nameserver 10.107.0.1\nport 53\n")
        self.assertEqual(len(self.flushes), 2)
        self.assertEqual(self.service.hosts_names(NAMES), {})
        self.assertEqual(self.bus.calls, [])
        self.successResultOf(self.service.stopService())
        self.assertEqual(os.listdir(self.directory), [])


class UpstreamsTests(SynchronousTestCase):
    """
    Where the DNS server sends other names (L{find_upstreams}).
    """

    def test_configuredFirst(self) -> None:
        """
        C{dns.upstreams} are used as given: resolved is not asked, no
        C{resolv.conf} read.
        """
        asked: list[str] = []

        def resolved() -> Deferred[tuple[Any, ...]]:
            asked.append("resolved")
            return succeed(())

        found = Deferred.fromCoroutine(
            find_upstreams(
                SocketReactor(),
                ["10.0.0.9:5353", "[fd00::1]:53"],
                resolved,
                ("/nonexistent/resolv.conf",),
                ("10.107.0.1", 53),
                Logger(),
            )
        )
        self.assertEqual(
            self.successResultOf(found), [("10.0.0.9", 5353), ("fd00::1", 53)]
        )
        self.assertEqual(asked, [])


class FilesRegistrationTests(SynchronousTestCase):
    """
    The server in C{/etc/resolver} (L{FilesRegistration}).
    """

    def test_unchangedWritesOnce(self) -> None:
        """
        The same domains and server registered twice are written once; a
        L{FilesRegistration.forget} writes them again.
        """
        written: list[object] = []

        class Files:
            def apply(self, domains: Any, address: Any, port: int) -> Any:
                written.append((domains, address, port))
                return succeed(FilesResult((), (), ()))

        registration = FilesRegistration(lambda: cast(Any, Files()), Logger())
        server = IPv4Address("10.107.0.1")
        for _ in range(2):
            changed = Deferred.fromCoroutine(registration.register(("ns",), server, 53))
            self.successResultOf(changed)
        self.assertEqual(written, [(("ns",), server, 53)])
        registration.forget()
        self.successResultOf(
            Deferred.fromCoroutine(registration.register(("ns",), server, 53))
        )
        self.assertEqual(len(written), 2)
