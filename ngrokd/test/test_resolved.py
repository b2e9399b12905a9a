"""
Tests for L{ngrokd.host.resolved}: the pure parts (domains, the calls and
their order, upstream servers), then registration with the real
systemd-resolved in a namespace (L{ngrokd.test.resolvedns}): names resolve
through it with C{resolvectl} and glibc, again after it restarts, and a
clean stop leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from ipaddress import ip_address, ip_network
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SkipTest, SynchronousTestCase

if not sys.platform.startswith("linux"):
    raise SkipTest("systemd-resolved is Linux-only")

from jeepney import HeaderFields

from ngrokd.host.dbus import CallTimedOut, DBusConnection, Disconnected, ErrorReply
from ngrokd.host.resolved import (
    BUS_NAME,
    MAX_DOMAINS,
    LinkSettings,
    ResolvedError,
    ResolvedLink,
    TooManyDomains,
    Upstream,
    choose_upstreams,
    link_calls,
    link_domains,
)
from ngrokd.test.namespace import end_process
from ngrokd.test.resolvedns import SETUP, ResolvedNamespace

OUR_SERVER = "10.107.0.1"
WEB = "10.107.0.2"


def ip(text: str) -> Any:
    return ip_address(text)


class LinkDomainsTests(SynchronousTestCase):
    """
    Our link's routing domains: the DNS server's zones, by their one rule,
    within resolved's bound.
    """

    def test_namesAreTheirOwnDomains(self) -> None:
        """
        A name under a public top-level domain routes itself, never its
        parent zone; names under a private one route that domain whole.
        """
        self.assertEqual(
            link_domains(["web.prod", "controller.example.com", "db.default"]),
            ("controller.example.com", "default", "web.prod"),
        )

    def test_wildcardAndCovered(self) -> None:
        """
        A wildcard routes its suffix; a name under another domain adds
        nothing; case and a final dot do not matter.
        """
        self.assertEqual(
            link_domains(
                ["*.apps.prod", "A.apps.prod.", "x.b.apps.prod", "apps2.prod"]
            ),
            ("apps.prod", "apps2.prod"),
        )

    def test_notDNSNames(self) -> None:
        """
        Something that is not a DNS name (an empty name, the root, a path)
        is refused, naming it.
        """
        for bad in ["", ".", "../etc", "*.", "a b.prod"]:
            with self.assertRaises(ValueError) as caught:
                link_domains(["web.prod", bad])
            self.assertIn(repr(bad), str(caught.exception))

    def test_bounded(self) -> None:
        """
        More domains than resolved takes on a link are refused, saying so.
        """
        link_domains([f"n{i}.prod" for i in range(MAX_DOMAINS)])
        with self.assertRaises(TooManyDomains) as caught:
            link_domains([f"n{i}.prod" for i in range(MAX_DOMAINS + 1)])
        self.assertIn(f"at most {MAX_DOMAINS}", str(caught.exception))


class LinkCallsTests(SynchronousTestCase):
    """
    The calls that set up a link, and their order.
    """

    def test_order(self) -> None:
        """
        Domains and default-route come before the servers, with LLMNR, mDNS,
        DNSSEC and DNS over TLS off in between; each names the link.
        """
        calls = link_calls(
            LinkSettings(7, (ip("10.107.0.1"), ip("fd00:6e67::1")), ("prod",))
        )
        self.assertEqual(
            [(c.header.fields[HeaderFields.member], c.body) for c in calls],
            [
                ("SetLinkDomains", (7, [("prod", True)])),
                ("SetLinkDefaultRoute", (7, False)),
                ("SetLinkLLMNR", (7, "no")),
                ("SetLinkMulticastDNS", (7, "no")),
                ("SetLinkDNSSEC", (7, "no")),
                ("SetLinkDNSOverTLS", (7, "no")),
                (
                    "SetLinkDNS",
                    (
                        7,
                        [
                            (2, bytes([10, 107, 0, 1])),
                            (10, ip("fd00:6e67::1").packed),
                        ],
                    ),
                ),
            ],
        )


class UpstreamTests(SynchronousTestCase):
    """
    resolved's DNS servers, less those that would loop back to us.
    """

    def test_filtered(self) -> None:
        """
        The stub addresses, our own addresses and servers of our own link
        are left out; order and ports are kept; C{DNS} entries (no port) get
        port 53; repeats are dropped.
        """
        entries = [
            (0, 2, ip("127.0.0.53").packed, 0, ""),
            (0, 2, ip("192.0.2.53").packed, 5353, "dns.example"),
            (3, 2, ip("10.107.0.1").packed, 0, ""),
            (3, 2, ip("192.0.2.99").packed, 0, ""),
            (2, 10, ip("2001:db8::53").packed, 0, ""),
            (0, 2, ip("127.0.0.54").packed),
            (0, 2, ip("192.0.2.54").packed),
            (0, 2, ip("192.0.2.54").packed),
            (0, 2, b"\x01\x02"),
        ]
        self.assertEqual(
            choose_upstreams(entries, {ip(OUR_SERVER)}, own_ifindex=3),
            (
                Upstream(ip("192.0.2.53"), 5353, 0, "dns.example"),
                Upstream(ip("2001:db8::53"), 53, 2, ""),
                Upstream(ip("192.0.2.54"), 53, 0, ""),
            ),
        )


class FakeBus:
    """
    Stands in for a L{DBusConnection}: records each call, answered when the
    test says.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, Deferred]] = []
        self.signal: Any = None

    def call(self, message, timeout: float = 10.0) -> Deferred:
        d: Deferred = Deferred()
        member = message.header.fields[HeaderFields.member]
        self.calls.append((member, message.body, d))
        return d

    def subscribe(self, rule, callback) -> Deferred:
        self.rule = rule
        self.signal = callback
        return succeed(None)

    def members(self) -> list[str]:
        return [member for member, _, _ in self.calls]

    def answer(self, failing: dict[str, Exception] | None = None) -> list[str]:
        """
        Answer the calls as they come, failing those named in C{failing};
        give the members answered.
        """
        answered = []
        while any(not d.called for _, _, d in self.calls):
            member, _, d = next(c for c in self.calls if not c[2].called)
            answered.append(member)
            if failing and member in failing:
                d.errback(failing[member])
            else:
                d.callback(())
        return answered


class ResolvedLinkTests(SynchronousTestCase):
    """
    L{ResolvedLink}'s order of events, with the bus faked.
    """

    def setUp(self) -> None:
        self.bus = FakeBus()
        self.changes: list[str | None] = []
        self.link = ResolvedLink(
            cast(DBusConnection, self.bus),
            LinkSettings(7, (ip(OUR_SERVER),), ("web.prod",)),
            lambda: self.changes.append(self.link.error),
        )

    def test_start(self) -> None:
        """
        start() watches resolved's bus name, then makes the calls in order,
        one after the other; then error is None.
        """
        d = self.link.start()
        self.assertEqual(self.bus.rule.arg_conditions, {0: (BUS_NAME, "string")})
        self.assertEqual(self.bus.members(), ["SetLinkDomains"])
        self.assertEqual(self.bus.answer(), SETUP)
        self.successResultOf(d)
        self.assertIsNone(self.link.error)

    def test_refused(self) -> None:
        """
        A refusal fails start() with the D-Bus error's name in the reason,
        kept in error; the calls after it are not made.
        """
        d = self.link.start()
        denied = ErrorReply(
            "SetLinkDNS", "org.freedesktop.DBus.Error.AccessDenied", "not allowed"
        )
        self.bus.answer({"SetLinkDNS": denied})
        failure = self.failureResultOf(d, ResolvedError)
        self.assertEqual(
            failure.value.dbus_name, "org.freedesktop.DBus.Error.AccessDenied"
        )
        self.assertEqual(
            self.link.error,
            "link 7: SetLinkDNS: org.freedesktop.DBus.Error.AccessDenied: not allowed",
        )
        self.assertNotIn("FlushCaches", self.bus.members())

    def test_flushFails(self) -> None:
        """
        A cache that cannot be flushed does not fail the registration.
        """
        d = self.link.start()
        self.bus.answer({"FlushCaches": CallTimedOut("FlushCaches: no reply")})
        self.successResultOf(d)
        self.assertIsNone(self.link.error)

    def test_restarts(self) -> None:
        """
        resolved leaving the bus is said in error; its return makes the
        calls again. Owner changes during an apply make one more apply, not
        one each.
        """
        self.link.start()
        self.bus.answer()
        self.bus.signal((BUS_NAME, ":1.4", ""))
        self.assertEqual(self.link.error, "systemd-resolved stopped")
        self.bus.signal((BUS_NAME, "", ":1.5"))
        self.assertEqual(self.bus.members()[-1], "SetLinkDomains")
        for owner in (":1.6", ":1.7", ":1.8"):
            self.bus.signal((BUS_NAME, "", owner))
        self.assertEqual(self.bus.answer(), SETUP + SETUP)
        self.assertIsNone(self.link.error)

    def test_changesSaid(self) -> None:
        """
        What changes without a call of ours is said: resolved leaving, and
        our settings applied again once it is back; our own calls are not.
        """
        self.link.start()
        self.bus.answer()
        self.assertEqual(self.changes, [])
        self.bus.signal((BUS_NAME, ":1.4", ""))
        self.bus.signal((BUS_NAME, "", ":1.5"))
        self.assertEqual(self.changes, ["systemd-resolved stopped"])
        self.bus.answer()
        self.assertEqual(self.changes, ["systemd-resolved stopped", None])

    def test_stop(self) -> None:
        """
        stop() reverts the link once the apply under way has ended, and no
        owner change applies anything after it; a resolved that is not
        running has nothing to revert.
        """
        self.link.start()
        stopped = self.link.stop()
        self.assertNoResult(stopped)
        self.assertEqual(
            self.bus.answer(
                {
                    "RevertLink": ErrorReply(
                        "RevertLink", "org.freedesktop.DBus.Error.NameHasNoOwner", ""
                    )
                }
            ),
            SETUP + ["RevertLink"],
        )
        self.successResultOf(stopped)
        self.bus.signal((BUS_NAME, "", ":1.9"))
        self.assertEqual(self.bus.answer(), [])

    def test_revertFails(self) -> None:
        """
        A refused revert fails stop() with the reason.
        """
        self.link.start()
        self.bus.answer()
        stopped = self.link.stop()
        self.bus.answer({"RevertLink": Disconnected("the bus closed the connection")})
        failure = self.failureResultOf(stopped, ResolvedError)
        self.assertEqual(
            str(failure.value), "cannot revert link 7: the bus closed the connection"
        )


def until(check, timeout: float = 15.0) -> Any:
    """
    Try C{check} every 0.2 s until it gives something true, for at most
    C{timeout} seconds; give its last result.
    """
    deadline = time.monotonic() + timeout
    result = check()
    while not result and time.monotonic() < deadline:
        time.sleep(0.2)
        result = check()
    return result


class RealResolvedTests(SynchronousTestCase):
    """
    Our link registered with the real systemd-resolved, in a namespace, by
    a process there that also serves our names (a minimal twisted.names
    server on our link's address).
    """

    def setUp(self) -> None:
        self.resolved = ResolvedNamespace(self, dns=["192.0.2.53", "198.51.100.53"])
        self.ns = self.resolved.ns
        self.link = self.make_link()

    def make_link(self) -> int:
        """
        Our link, as the daemon makes it on this machine (a dummy link, or a
        bridge given a carrier where the kernel has none), with our
        server's address.
        """
        from pyroute2 import IPRoute

        from ngrokd.host.netif.linux import LinuxInterface
        from ngrokd.test.test_netif import ImmediateReactor, SynchronousThreadPool

        interface = LinuxInterface(
            ImmediateReactor(),
            SynchronousThreadPool(),
            "ngrokd0",
            ip_network("10.107.0.0/16"),
            netlink=partial(IPRoute, netns=self.ns.net_path),
        )
        self.successResultOf(interface.create())
        self.successResultOf(interface.ensure_addresses({ip(OUR_SERVER)}))
        # A port that comes and goes leaves an empty bridge without a
        # carrier of its own, as some kernels make every empty bridge: the
        # carrier is then the veth pair's alone.
        for argv in (
            ["ip", "link", "add", "other0", "type", "veth", "peer", "other1"],
            ["ip", "link", "set", "other0", "master", "ngrokd0"],
            ["ip", "link", "del", "other0"],
        ):
            self.assertEqual(self.ns.run(argv).returncode, 0)
        with IPRoute(netns=self.ns.net_path) as ipr:
            return int(ipr.link_lookup(ifname="ngrokd0")[0])

    def register(self) -> subprocess.Popen[str]:
        """
        Start the process that serves our names and registers our link; it
        says what it did as one JSON line, then waits for commands.
        """
        process = subprocess.Popen(
            self.resolved.enter([sys.executable, "-c", _REGISTER, str(self.link)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        self.addCleanup(end_process, process)
        return process

    def answer(self, process: subprocess.Popen[str], command: str | None = None) -> Any:
        assert process.stdin is not None and process.stdout is not None
        if command is not None:
            process.stdin.write(command + "\n")
            process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            assert process.stderr is not None
            raise AssertionError(
                f"the registering process ended: {process.stderr.read()}\n"
                f"resolved's log:\n{self.resolved.read_log()}"
            )
        return json.loads(line)

    def query(self) -> str:
        result = self.resolved.resolvectl("query", "--cache=no", "web.prod")
        return result.stdout if result.returncode == 0 else ""

    def test_namesResolve(self) -> None:
        """
        After registration, resolvectl and glibc (getent, through the stub
        at 127.0.0.53) find our address for web.prod; the probe saw it
        through getaddrinfo and our server got the query; resolved is seen
        running and its own servers are read (ours left out).
        """
        process = self.register()
        started = self.answer(process)
        self.assertEqual(started["running"], True)
        self.assertIsNone(started["error"])
        self.assertEqual(started["probe"], [["10.107.0.2"], None])
        self.assertIn("web.prod", started["seen"])
        self.assertEqual(started["upstreams"], ["192.0.2.53", "198.51.100.53"])
        self.assertIn(WEB, self.query())
        getent = self.resolved.run(["getent", "ahosts", "web.prod"])
        self.assertEqual(getent.returncode, 0, getent.stderr)
        self.assertEqual(
            {line.split()[0] for line in getent.stdout.splitlines()}, {WEB}
        )
        status = self.resolved.resolvectl("status", "ngrokd0").stdout
        self.assertIn("~db.prod ~web.prod", status)
        self.assertIn("-DefaultRoute", status)
        self.assertIn("-LLMNR -mDNS", status)

    def test_otherNamesNotOurs(self) -> None:
        """
        A name outside our domains never reaches our server (default-route
        is off on our link).
        """
        process = self.register()
        self.answer(process)
        self.resolved.resolvectl("query", "--cache=no", "elsewhere.example")
        self.assertNotIn("elsewhere.example", self.answer(process, "status")["seen"])

    def test_restart(self) -> None:
        """
        When resolved restarts (and forgets every link setting), the
        settings are applied again and the name resolves within seconds.
        """
        process = self.register()
        self.answer(process)
        self.resolved.stop_resolved()
        stopped = self.answer(process, "status")
        self.assertEqual(stopped["error"], "systemd-resolved stopped")
        self.resolved.start_resolved()
        self.assertIn(WEB, until(self.query), self.resolved.read_log())
        self.assertIsNone(self.answer(process, "status")["error"])

    def test_cleanStop(self) -> None:
        """
        A clean stop reverts the link: resolved keeps no DNS server and no
        domain for it, and the name no longer resolves.
        """
        process = self.register()
        self.answer(process)
        self.assertEqual(self.answer(process, "stop"), {"stopped": None})
        self.assertEqual(process.wait(timeout=10), 0)
        dns = self.resolved.resolvectl("dns", "ngrokd0")
        domain = self.resolved.resolvectl("domain", "ngrokd0")
        self.assertEqual((dns.returncode, domain.returncode), (0, 0))
        self.assertEqual(dns.stdout.split(":", 1)[1].strip(), "")
        self.assertEqual(domain.stdout.split(":", 1)[1].strip(), "")
        self.assertNotIn(WEB, self.query())

    def test_errorsNamed(self) -> None:
        """
        resolved's refusal is reported with its D-Bus error name: here a
        link it does not know.
        """
        process = self.register()
        self.answer(process)
        answer = self.answer(process, "wrong-link")
        self.assertIn("link 9999", answer["error"])
        self.assertIn("org.freedesktop.resolve1.NoSuchLink", answer["error"])


#: Serves web.prod and db.prod on our link's address and registers the
#: link given as argv[1]; one JSON line after start and after each command
#: read from stdin (status, wrong-link, stop).
_REGISTER = """
import json, socket, sys
from ipaddress import ip_address
from twisted.internet import defer, reactor, stdio
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase
from twisted.protocols.basic import LineReceiver

from ngrokd.host.dbus import connect
from ngrokd.host.probe import probe
from ngrokd.host.resolved import (
    LinkSettings, ResolvedError, ResolvedLink, link_domains, resolved_running,
    upstream_servers)

link_index = int(sys.argv[1])
ours = ip_address("10.107.0.1")
names = {"web.prod": "10.107.0.2", "db.prod": "10.107.0.3"}
seen = []

class Names(ResolverBase):
    def _lookup(self, name, cls, type, timeout):
        name = name.decode().lower()
        seen.append(name)
        if name not in names:
            return defer.fail(error.DomainError(name))
        if type != dns.A:
            return defer.succeed(([], [], []))
        record = dns.RRHeader(name, dns.A, ttl=5, payload=dns.Record_A(names[name], 5))
        return defer.succeed(([record], [], []))

factory = server.DNSServerFactory(clients=[Names()])
reactor.listenUDP(53, dns.DNSDatagramProtocol(factory), interface=str(ours))
reactor.listenTCP(53, factory, interface=str(ours))
settings = LinkSettings(link_index, (ours,), link_domains(names))

def say(value):
    sys.stdout.write(json.dumps(value) + "\\n")
    sys.stdout.flush()

class Commands(LineReceiver):
    delimiter = b"\\n"
    def lineReceived(self, line):
        defer.ensureDeferred(command(line.decode().strip()))
    def connectionLost(self, reason):
        if reactor.running:
            reactor.stop()

async def command(line):
    if line == "status":
        say({"error": link.error, "seen": seen})
    elif line == "wrong-link":
        other = ResolvedLink(connection, LinkSettings(9999, (ours,), ("x.prod",)))
        try:
            await other.start()
        except ResolvedError as e:
            say({"error": str(e)})
    elif line == "stop":
        try:
            await link.stop()
            say({"stopped": None})
        except ResolvedError as e:
            say({"stopped": str(e)})
        reactor.stop()

async def main():
    global connection, link
    connection = await connect(reactor)
    running = await resolved_running(connection)
    link = ResolvedLink(connection, settings)
    await link.start()
    upstreams = await upstream_servers(connection, {ours}, link_index)
    probed = await probe(reactor, reactor, reactor.getThreadPool(), "web.prod",
                         ip_address("10.107.0.2"))
    say({"running": running, "error": link.error, "seen": seen,
         "probe": [list(probed.addresses), probed.reason],
         "upstreams": [str(u.address) for u in upstreams]})
    stdio.StandardIO(Commands())

def failed(failure):
    sys.stderr.write(failure.getTraceback())
    reactor.stop()

reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addErrback(failed))
reactor.run()
"""
