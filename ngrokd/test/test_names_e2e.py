"""
Names end to end: the daemon (C{twistd -n ngrokd}) in a namespace with the
devcloud and backends, its DNS server on its link's address, reached by the
system's resolver as programs use it.

    - with the real systemd-resolved and its own bus in the namespace
      (L{ngrokd.test.resolvedns}): the daemon registers its link,
      C{resolvectl} and glibc (C{getent}, through resolved's stub) find our
      names, a wildcard's too, and bytes go through by name; the hosts file
      holds nothing; a resolved restart is followed by working names within
      seconds; a clean stop leaves resolved without our domains; resolved
      absent at the start means the hosts file, the reason in status and
      C{/readyz}, until it comes; with an IPv6 block, the server answers
      over IPv6 on that block's first address too, and resolved has both
      of its addresses; C{ngrokctl diagnose} passes every hop of
      the names' path, and with resolved stopped names it as the first
      broken one;
    - glibc without resolved: a program whose C{/etc/resolv.conf} names our
      server (as C{docker run --dns} gives a container) resolves a name and
      a wildcard name through it and reaches them, while the system itself
      uses the hosts file (C{dns.mode: hosts}).

Nothing here touches this machine's resolver, bus, links or hosts file.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

if not sys.platform.startswith("linux"):
    raise SkipTest("namespaces are Linux-only")

from ngrokd.test.resolvedns import ResolvedNamespace
from ngrokd.test.test_netns_e2e import _CLIENT, World

#: Addresses go to the names in sorted order, from the second on.
APPS = "10.107.0.2"
DB = "10.107.0.3"
WEB = "10.107.0.4"
SERVER = "10.107.0.1"
SUBNET6 = "fd6e:6772:6f6b::/64"
SERVER6 = "fd6e:6772:6f6b::1"
APPS6 = "fd6e:6772:6f6b::2"
WEB6 = "fd6e:6772:6f6b::4"
ENDPOINTS = [
    ("http://web.prod", "web"),
    ("tcp://db.prod:5432", "echo"),
    ("http://*.apps.prod", "web"),
]


#: Asks server argv[1] for argv[2]'s A and AAAA records, over UDP then TCP;
#: prints the addresses answered.
_ASK = """
import socket, struct, sys
from twisted.names import dns
def ask(kind, qtype):
    query = dns.Message(id=7, recDes=True)
    query.queries = [dns.Query(sys.argv[2], qtype)]
    data = query.toStr()
    with socket.socket(socket.AF_INET6, kind) as s:
        s.settimeout(10)
        s.connect((sys.argv[1], 53))
        if kind == socket.SOCK_DGRAM:
            s.send(data)
            reply = s.recv(4096)
        else:
            s.sendall(struct.pack("!H", len(data)) + data)
            reply = b""
            while len(reply) < 2 or len(reply) < 2 + struct.unpack("!H", reply[:2])[0]:
                more = s.recv(4096)
                if not more:
                    break
                reply += more
            reply = reply[2:]
    answer = dns.Message()
    answer.fromStr(reply)
    for record in answer.answers:
        if record.type == dns.A:
            print(record.payload.dottedQuad())
        elif record.type == dns.AAAA:
            print(socket.inet_ntop(socket.AF_INET6, record.payload.address))
for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
    for qtype in (dns.A, dns.AAAA):
        ask(kind, qtype)
"""


def addresses(getent: str) -> set[str]:
    """
    The addresses C{getent ahosts} printed.
    """
    return {line.split()[0] for line in getent.splitlines() if line.strip()}


class ResolvedTests(SynchronousTestCase):
    """
    The daemon and the real systemd-resolved.
    """

    def setUp(self) -> None:
        self.resolved = ResolvedNamespace(self, dns=["192.0.2.53"])

    def world(self, subnet6: str = "", **dns: Any) -> World:
        return World(
            self,
            ENDPOINTS,
            dns={"mode": "resolved", **dns},
            resolved=self.resolved,
            subnet6=subnet6,
        )

    def names(self, world: World) -> dict[str, Any]:
        """
        What status says of the names (nothing before the daemon answers).
        """
        try:
            status = world.ngrokctl_json("status")
        except AssertionError:
            return {"names_via": "", "names_fallback": "", "ready": False}
        return {k: status[k] for k in ("names_via", "names_fallback", "ready")}

    def getent(self, name: str) -> set[str]:
        result = self.resolved.run(["getent", "ahosts", name])
        return addresses(result.stdout) if result.returncode == 0 else set()

    def query(self, name: str) -> str:
        result = self.resolved.resolvectl("query", "--cache=no", name)
        return result.stdout if result.returncode == 0 else result.stderr

    def explain(self, world: World) -> str:
        return f"{world.explain()}\n--- resolved:\n{self.resolved.read_log()[-4000:]}"

    def test_namesThroughResolved(self) -> None:
        """
        The daemon registers its link: resolvectl and getent find each name
        (a name under the wildcard too) at its address, programs connect by
        name, and the hosts file holds nothing; resolved restarted, the
        names work again within seconds; stopped cleanly, resolved keeps no
        domain of ours.
        """
        world = self.world()
        daemon = world.start_daemon()
        world.wait(
            lambda: "systemd-resolved" in self.names(world)["names_via"],
            "names through systemd-resolved",
        )
        self.assertEqual(
            self.names(world),
            {
                "names_via": f"systemd-resolved; DNS server on {SERVER}:53",
                "names_fallback": "",
                "ready": True,
            },
        )
        self.assertIn(WEB, self.query("web.prod"), self.explain(world))
        self.assertEqual(
            [self.getent(n) for n in ("web.prod", "db.prod", "x.apps.prod")],
            [{WEB}, {DB}, {APPS}],
        )
        self.assertEqual(world.section(), None)
        results = json.loads(
            self.resolved.run(
                [
                    sys.executable,
                    "-c",
                    _CLIENT,
                    json.dumps(
                        [
                            ["http", "web.prod", 80],
                            ["http", "a.b.apps.prod", 80],
                            ["echo", "db.prod", 5432, "to db"],
                        ]
                    ),
                ]
            ).stdout
        )
        self.assertEqual(results, ["host=web.prod\n", "host=a.b.apps.prod\n", "to db"])
        status = self.resolved.resolvectl("status", "ngrokd0").stdout
        self.assertIn("~apps.prod ~db.prod ~web.prod", status)
        self.assertIn("-DefaultRoute", status)

        self.resolved.stop_resolved()
        world.wait(
            lambda: self.names(world)["names_fallback"] == "systemd-resolved stopped",
            "the hosts file while resolved is away",
        )
        world.wait(
            lambda: world.section() == [f"{DB}\tdb.prod", f"{WEB}\tweb.prod"],
            "the names in the hosts file",
        )
        self.resolved.start_resolved()
        world.wait(lambda: WEB in self.query("web.prod"), "web.prod again")
        world.wait(lambda: world.section() is None, "the hosts file emptied again")
        self.assertEqual(self.names(world)["names_fallback"], "")

        daemon.signal(signal.SIGTERM)
        daemon.wait()
        everything = self.resolved.resolvectl("status").stdout
        self.assertNotIn("web.prod", everything)
        self.assertNotIn(SERVER, everything)
        self.assertEqual(self.getent("web.prod"), set())

    def test_ipv6Server(self) -> None:
        """
        With an IPv6 block, the server listens on its first address too: a
        query over IPv6 (UDP and TCP) to it is answered with the name's
        addresses, and resolved has both of the server's addresses for our
        link.
        """
        world = self.world(subnet6=SUBNET6)
        world.start_daemon()
        world.wait(
            lambda: "systemd-resolved" in self.names(world)["names_via"],
            "names through systemd-resolved",
        )
        self.assertEqual(
            self.names(world)["names_via"],
            f"systemd-resolved; DNS server on {SERVER}:53, [{SERVER6}]:53",
        )
        answers = self.resolved.run([sys.executable, "-c", _ASK, SERVER6, "web.prod"])
        self.assertEqual(answers.stdout.split(), [WEB, WEB6, WEB, WEB6], answers.stderr)
        servers = self.resolved.resolvectl("dns", "ngrokd0").stdout
        self.assertIn(f"{SERVER} {SERVER6}", servers, self.explain(world))

    def diagnose(self, world: World) -> tuple[int, dict[str, Any]]:
        """
        What C{ngrokctl diagnose -o json} says, run beside resolved, and its
        exit status.
        """
        argv = ["-m", "ngrokd.ctl", "--socket", world.socket_path, "diagnose"]
        result = world.run([sys.executable, *argv, "-o", "json"], timeout=60)
        return result.returncode, json.loads(result.stdout or "{}")

    def test_diagnoseNames(self) -> None:
        """
        C{ngrokctl diagnose} checks the names' path hop by hop through the
        real resolved: the DNS server answers (AAAA too), resolved routes
        our domains to it on our link, resolv.conf sends programs to
        resolved, and getaddrinfo gives each name (a name under the
        wildcard too) its IPv4 and IPv6 addresses: every hop passes. With
        resolved stopped, its hop is the first broken one, with what to do.
        """
        world = World(
            self,
            ENDPOINTS,
            dns={"mode": "resolved"},
            resolved=self.resolved,
            subnet6=SUBNET6,
        )
        world.start_daemon()
        world.wait(
            lambda: "systemd-resolved" in self.names(world)["names_via"],
            "names through systemd-resolved",
        )
        code, document = self.diagnose(world)
        self.assertEqual((code, document["first_broken"]), (0, None), document)
        checks = {check["name"]: check for check in document["checks"]}
        self.assertEqual({check["state"] for check in checks.values()}, {"pass"})
        self.assertEqual(
            {
                hop: checks[hop]["detail"]
                for hop in (
                    "DNS server answers",
                    "systemd-resolved routes our domains",
                    "resolv.conf points at systemd-resolved",
                    "hosts section matches",
                    "*.apps.prod resolves",
                    "web.prod resolves",
                )
            },
            {
                "DNS server answers": f"{SERVER}:53: ngrokd-diagnose.apps.prod is"
                f" {APPS}, {APPS6}",
                "systemd-resolved routes our domains": f"ngrokd0: server {SERVER},"
                " domains ~apps.prod ~db.prod ~web.prod",
                "resolv.conf points at systemd-resolved": "/etc/resolv.conf:"
                " nameserver 127.0.0.53",
                "hosts section matches": f"{world.hosts_path}: 0 names",
                "*.apps.prod resolves": f"ngrokd-diagnose.apps.prod: {APPS}, {APPS6}",
                "web.prod resolves": f"{WEB}, {WEB6}",
            },
        )

        self.resolved.stop_resolved()
        world.wait(
            lambda: self.names(world)["names_fallback"] == "systemd-resolved stopped",
            "the hosts file while resolved is away",
        )
        code, document = self.diagnose(world)
        self.assertEqual(
            (code, document["first_broken"]),
            (1, "systemd-resolved routes our domains"),
            document,
        )
        (check,) = [
            c for c in document["checks"] if c["name"] == document["first_broken"]
        ]
        self.assertIn("systemd-resolved is not running", check["detail"])
        self.assertIn("systemctl start systemd-resolved", check["hint"])

    def test_resolvedAbsent(self) -> None:
        """
        With resolved not running, the names are in the hosts file, and
        status and /readyz say why; once resolved starts, the daemon
        registers its link and the hosts file empties.
        """
        self.resolved.stop_resolved()
        world = self.world()
        world.start_daemon()
        world.wait(
            lambda: world.section() == [f"{DB}\tdb.prod", f"{WEB}\tweb.prod"],
            "the names in the hosts file",
        )
        names = self.names(world)
        self.assertIn("systemd-resolved is not running", names["names_fallback"])
        self.assertFalse(names["ready"])
        status, body = world.get("/readyz")
        self.assertEqual(status, 503)
        self.assertIn("endpoint names do not resolve as configured", body)
        self.assertIn("systemd-resolved is not running", body)
        rows = {row["url"]: row for row in world.ngrokctl_json("list")}
        self.assertIn(
            "no name under apps.prod reaches it", rows["http://*.apps.prod"]["reason"]
        )

        self.resolved.start_resolved()
        world.wait(lambda: world.section() is None, "the hosts file emptied")
        self.assertEqual(self.getent("x.apps.prod"), {APPS})
        self.assertTrue(self.names(world)["ready"])


class ResolvConfTests(SynchronousTestCase):
    """
    glibc asking our server directly, as a container given C{--dns} does.
    """

    def test_resolvConfNamesOurServer(self) -> None:
        """
        A program whose resolv.conf names our server finds a name (A and
        AAAA) and a wildcard name through it, and reaches them by name; the
        system itself has the exact names in the hosts file (C{dns.mode:
        hosts}), and status says the wildcard cannot be reached by name
        there.
        """
        world = World(self, ENDPOINTS, dns={"mode": "hosts"}, subnet6=SUBNET6)
        world.start_daemon()
        world.wait(
            lambda: f"{WEB}\tweb.prod" in (world.section() or []),
            "the names in the hosts file",
        )
        # Its own /etc (no hosts lines of ours), its resolv.conf ours.
        client = (
            f"echo 'nameserver {SERVER}' > /etc/resolv.conf"
            " && getent ahosts web.prod && echo -- && getent ahosts q.apps.prod"
            ' && echo -- && exec "$@"'
        )
        checks = [["http", "web.prod", 80], ["http", "q.apps.prod", 80]]
        result = world.ns.run(
            [
                "sh",
                "-c",
                client,
                "client",
                sys.executable,
                "-c",
                _CLIENT,
                json.dumps(checks),
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr + world.explain())
        web, apps, answers = result.stdout.split("--\n")
        self.assertEqual(
            (addresses(web), addresses(apps)), ({WEB, WEB6}, {APPS, APPS6})
        )
        self.assertEqual(json.loads(answers), ["host=web.prod\n", "host=q.apps.prod\n"])
        rows = {row["url"]: row for row in world.ngrokctl_json("list")}
        self.assertIn(
            "a hosts file cannot hold a wildcard", rows["http://*.apps.prod"]["reason"]
        )
        self.assertEqual(rows["http://web.prod"]["reason"], "")
