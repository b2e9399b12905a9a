"""
Tests for L{ngrokd.instance}: several daemons on one host, each keeping to
its own files, socket, interface and hosts section.
"""

from __future__ import annotations

import os
from ipaddress import ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.config import Config, ConfigError, parse_config
from ngrokd.config.context import Context
from ngrokd.config.derived import derive
from ngrokd.control.client import EXIT_USAGE
from ngrokd.devcloud.tap import RunningDevcloud
from ngrokd.host.hostsection import BEGIN, END, render
from ngrokd.host.hostsfile import HostsFile
from ngrokd.instance import (
    MAX_INTERFACE_NAME,
    InstanceNameError,
    check_name,
    config_path,
    hosts_markers,
    interface_name,
    is_hosts_marker,
    socket_path,
    state_dir,
)
from ngrokd.reconfigure import HOT, changes
from ngrokd.tap import Options
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", fullmatch=True)
#: A named instance's file: everything it must set for itself.
OWN = """\
server:
  health_address: 127.0.0.1:8091
net:
  subnet: 10.108.0.0/16
"""


class DerivationTests(SynchronousTestCase):
    """
    The unnamed instance keeps every default; a named one derives its own,
    and no two names derive the same place.
    """

    def test_unnamed(self) -> None:
        """
        The unnamed instance's places are the ones ngrokd always used.
        """
        self.assertEqual(state_dir(""), "/etc/ngrokd")
        self.assertEqual(config_path(""), "/etc/ngrokd/config.yml")
        self.assertEqual(socket_path(""), "/var/run/ngrokd.sock")
        self.assertEqual(interface_name(""), "ngrokd0")
        self.assertEqual(hosts_markers(""), (BEGIN, END))
        self.assertEqual(BEGIN, "# BEGIN ngrokd managed section")

    def test_named(self) -> None:
        """
        A named instance's places carry its name.
        """
        self.assertEqual(state_dir("work"), "/etc/ngrokd/work")
        self.assertEqual(config_path("work"), "/etc/ngrokd/work/config.yml")
        self.assertEqual(socket_path("work"), "/var/run/ngrokd-work.sock")
        self.assertEqual(interface_name("work"), "ngrokd-work")
        self.assertEqual(
            hosts_markers("work"),
            (
                "# BEGIN ngrokd-work managed section",
                "# END ngrokd-work managed section",
            ),
        )

    @given(names, names)
    def test_distinct(self, one: str, other: str) -> None:
        """
        Two different names (the unnamed instance included) never share a
        state directory, socket, interface or hosts marker.
        """
        for a, b in ((one, other), ("", other)):
            if a == b:
                continue
            self.assertNotEqual(state_dir(a), state_dir(b))
            self.assertNotEqual(socket_path(a), socket_path(b))
            self.assertTrue(set(hosts_markers(a)).isdisjoint(hosts_markers(b)))
            if interface_name(a) and interface_name(b):
                self.assertNotEqual(interface_name(a), interface_name(b))

    @given(names)
    def test_interfaceFitsOrNone(self, name: str) -> None:
        """
        The derived interface is C{ngrokd-NAME} when it fits Linux's limit,
        and nothing (never a truncated name) when it does not.
        """
        derived = interface_name(name)
        if len("ngrokd-" + name) <= MAX_INTERFACE_NAME:
            self.assertEqual(derived, "ngrokd-" + name)
        else:
            self.assertIsNone(derived)

    @given(names)
    def test_markersRecognised(self, name: str) -> None:
        """
        Every instance's marker lines are known as markers.
        """
        self.assertTrue(all(map(is_hosts_marker, hosts_markers(name))))
        self.assertEqual(check_name(name), name)

    def test_badNames(self) -> None:
        """
        A name that cannot name a file, socket and interface is refused,
        saying what a name may hold.
        """
        for bad in ("Work", "-a", "a-", "a b", "a/b", "a.b", "x" * 33, "é"):
            with self.assertRaises(InstanceNameError) as caught:
                check_name(bad)
            self.assertIn("a-z, 0-9 and '-'", str(caught.exception))


class ConfigTests(SynchronousTestCase):
    """
    C{server.instance} and C{--instance} in the configuration.
    """

    def parse(self, text: str, instance: str | None = None) -> Config:
        return parse_config(text, "/c.yml", {}, "linux", instance=instance).config

    def test_unnamedUnchanged(self) -> None:
        """
        Without an instance, every setting is what it always was.
        """
        config = self.parse("")
        self.assertEqual(config.server.instance, "")
        self.assertEqual(config.server.socket_path, "/var/run/ngrokd.sock")
        self.assertEqual(config.server.state_dir, "/etc/ngrokd")
        self.assertEqual(config.server.client_cert, "/etc/ngrokd/tls.crt")
        self.assertEqual(config.server.health_address, "127.0.0.1:8081")
        self.assertEqual(config.net.interface_name, "ngrokd0")
        self.assertEqual(str(config.net.subnet), "10.107.0.0/16")
        self.assertEqual(config.net.start_port, 9080)

    def test_namedDerives(self) -> None:
        """
        A named instance derives its state directory (and the certificate
        in it), socket and interface.
        """
        config = self.parse("server:\n  instance: work\n" + OWN.partition("\n")[2])
        self.assertEqual(config.server.instance, "work")
        self.assertEqual(config.server.state_dir, "/etc/ngrokd/work")
        self.assertEqual(config.server.client_key, "/etc/ngrokd/work/tls.key")
        self.assertEqual(config.server.socket_path, "/var/run/ngrokd-work.sock")
        self.assertEqual(config.net.interface_name, "ngrokd-work")

    def test_explicitWins(self) -> None:
        """
        Values set in the file win over the derived ones.
        """
        config = self.parse(
            "server:\n  health_address: ''\n  socket_path: /run/w.sock\n"
            "  state_dir: /srv/w\nnet:\n  subnet: 10.9.0.0/24\n"
            "  interface_name: nd-w\n",
            "work",
        )
        self.assertEqual(config.server.socket_path, "/run/w.sock")
        self.assertEqual(config.server.state_dir, "/srv/w")
        self.assertEqual(config.server.health_address, "")
        self.assertEqual(config.net.interface_name, "nd-w")

    def test_optionReplacesKey(self) -> None:
        """
        C{--instance} replaces C{server.instance}.
        """
        config = self.parse(
            "server:\n  instance: home\n" + OWN.partition("\n")[2], "work"
        )
        self.assertEqual(config.server.instance, "work")
        self.assertEqual(config.server.state_dir, "/etc/ngrokd/work")

    def test_badName(self) -> None:
        """
        A bad name is refused naming the key (file and line) or the option.
        """
        with self.assertRaises(ConfigError) as caught:
            parse_config("server:\n  instance: Big\n", "/c.yml", {}, "linux")
        self.assertIn(
            "/c.yml:2: server.instance: must be at most", str(caught.exception)
        )
        with self.assertRaises(ConfigError) as caught:
            parse_config(OWN, "/c.yml", {}, "linux", instance="a/b")
        self.assertIn("--instance: must be at most", str(caught.exception))

    def test_interfaceTooLong(self) -> None:
        """
        A name whose interface would not fit is refused, naming the
        interface and the key that would fix it, unless the key is set.
        """
        with self.assertRaises(ConfigError) as caught:
            parse_config(OWN, "/c.yml", {}, "linux", instance="production")
        message = str(caught.exception)
        self.assertIn("/c.yml: net.interface_name: instance 'production'", message)
        self.assertIn("ngrokd-production", message)
        config = self.parse(OWN + "  interface_name: nd-prod\n", "production")
        self.assertEqual(config.net.interface_name, "nd-prod")

    def test_ownNumbers(self) -> None:
        """
        A named instance must set the health address, the subnet when it
        may listen in virtual mode and the first port when it may listen on
        a network address: the unnamed instance's would collide.
        """
        cases = [
            ("net:\n  subnet: 10.108.0.0/16\n", "server.health_address"),
            ("server:\n  health_address: ''\n", "net.subnet"),
            (
                "server:\n  health_address: ''\nnet:\n  listen_interface: 127.0.0.1\n",
                "net.start_port",
            ),
            (OWN + "  overrides: {a.test: 0.0.0.0}\n", "net.start_port"),
        ]
        for text, key in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_config(text, "/c.yml", {}, "linux", instance="work")
            self.assertIn(
                f"/c.yml: {key}: instance 'work' must set its own",
                str(caught.exception),
            )
        network = (
            "server:\n  health_address: ''\nnet:\n"
            "  listen_interface: 127.0.0.1\n  start_port: 20000\n"
        )
        config = self.parse(network, "work")
        self.assertEqual(config.net.start_port, 20000)

    def test_restartOnly(self) -> None:
        """
        A changed instance waits for a restart, as what it names does.
        """
        self.assertNotIn("server.instance", HOT)
        one = self.parse(OWN, "one")
        two = self.parse(OWN, "two")
        found = changes(one, two)
        self.assertEqual(found.hot, {})
        self.assertIn("server.instance", found.restart)
        self.assertIn("server.socket_path", found.restart)


class DeriveTests(SynchronousTestCase):
    """
    L{derive}: what a file leaves out follows from the instance's name, the
    platform and the environment alone.
    """

    def test_named(self) -> None:
        """
        A named instance's socket, state directory, certificate, key and
        interface follow its name; the environment gives the API key and
        the hosts file.
        """
        found = {"server.health_address": "", "net.subnet": ip_network("10.9.0.0/24")}
        environ = {"NGROK_API_KEY": "k", "NGROKD_HOSTS_PATH": "/h"}
        self.assertEqual(
            derive(Context("/c.yml", "linux"), found, environ, "work"),
            {
                "api.key": "k",
                "server.instance": "work",
                "server.socket_path": "/var/run/ngrokd-work.sock",
                "server.state_dir": "/etc/ngrokd/work",
                "server.client_cert": "/etc/ngrokd/work/tls.crt",
                "server.client_key": "/etc/ngrokd/work/tls.key",
                "net.interface_name": "ngrokd-work",
                "net.subnet": ip_network("10.9.0.0/24"),
                "net.subnet6": "auto",
                "net.hosts_file": "/h",
            },
        )

    def test_unnamedOnMacOS(self) -> None:
        """
        The unnamed instance on macOS keeps the original's paths, takes its
        addresses in 127.0.0.0/8 and has no IPv6 block; the certificate's
        directory is the state directory.
        """
        found = {"server.client_cert": "/srv/n/c.pem"}
        self.assertEqual(
            derive(Context("/c.yml", "darwin"), found, {}, None),
            {
                "api.key": "",
                "server.instance": "",
                "server.socket_path": "/var/run/ngrokd.sock",
                "server.state_dir": "/srv/n",
                "server.client_cert": "/srv/n/c.pem",
                "server.client_key": "/srv/n/tls.key",
                "net.interface_name": "ngrokd0",
                "net.subnet": ip_network("127.0.0.0/8"),
                "net.subnet6": "",
                "net.hosts_file": "/etc/hosts",
            },
        )


class HostsSectionTests(SynchronousTestCase):
    """
    Each instance's section of one hosts file is its own.
    """

    def test_sideBySide(self) -> None:
        """
        Two instances write, rewrite and remove their sections in one file
        without changing a byte of the other's.
        """
        base = "127.0.0.1\tlocalhost\n"
        a = {"a.test": ip_address("10.107.0.2")}
        b = {"b.test": ip_address("10.108.0.2")}
        both = render(render(base, a), b, "work")
        self.assertIn("# BEGIN ngrokd-work managed section\n10.108.0.2\tb.test\n", both)
        self.assertIn(f"{BEGIN}\n10.107.0.2\ta.test\n{END}\n", both)
        moved = render(both, {"a.test": ip_address("10.107.0.3")})
        self.assertEqual(render(moved, {}), render(base, b, "work"))
        self.assertEqual(render(render(both, {}, "work"), {}), base)
        self.assertEqual(render(both, b, "work"), both)

    def test_unfinishedSectionStopsAtAnother(self) -> None:
        """
        A section cut short (no END line) never takes in the next
        instance's section, even when a stray END of its own follows.
        """
        text = (
            f"{BEGIN}\n10.107.0.2\ta.test\n"
            "# BEGIN ngrokd-work managed section\n10.108.0.2\tb.test\n"
            "# END ngrokd-work managed section\n"
            f"{END}\n"
        )
        self.assertEqual(
            render(text, {}),
            "# BEGIN ngrokd-work managed section\n10.108.0.2\tb.test\n"
            "# END ngrokd-work managed section\n",
        )

    def test_fileRemovesOnlyItsOwn(self) -> None:
        """
        L{HostsFile.remove} of one instance leaves the other's section.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("127.0.0.1\tlocalhost\n")
        work, home = HostsFile(path, instance="work"), HostsFile(path)
        work.write({"w.test": ip_address("10.108.0.2")})
        home.write({"h.test": ip_address("10.107.0.2")})
        self.assertTrue(work.remove())
        self.assertFalse(work.has_section())
        self.assertTrue(home.has_section())
        with open(path) as f:
            self.assertEqual(
                f.read(),
                f"127.0.0.1\tlocalhost\n\n{BEGIN}\n10.107.0.2\th.test\n{END}\n",
            )


class OptionTests(SynchronousTestCase):
    """
    C{twistd ngrokd --instance NAME}.
    """

    def test_instanceOption(self) -> None:
        """
        C{--instance} names the instance the file is read as.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(OWN)
        options = Options()
        options.parseOptions(["--config", path, "--instance", "work"])
        self.assertEqual(options.loaded.config.server.instance, "work")
        self.assertEqual(
            options.loaded.config.server.socket_path, "/var/run/ngrokd-work.sock"
        )

    def test_badInstance(self) -> None:
        """
        A bad name is a usage error naming the option.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(OWN)
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path, "--instance", "No"])
        self.assertIn("--instance: must be", str(caught.exception))


class NgrokctlInstanceTests(TestCase):
    """
    C{ngrokctl --instance NAME} talks to that instance's socket.
    """

    def test_socketOfInstance(self) -> Deferred[None]:
        """
        C{--instance} picks the instance's socket over C{$NGROKD_SOCKET};
        a bad name is a usage error.
        """

        async def run() -> None:
            ran = await ngrokctl(
                "/nonexistent/other.sock", "--instance", "zz9", "status"
            )
            self.assertIn("/var/run/ngrokd-zz9.sock", ran.err)
            bad = await ngrokctl("/nonexistent/other.sock", "--instance", "Z", "status")
            self.assertEqual(bad.code, EXIT_USAGE)
            self.assertIn("--instance: must be", bad.err)

        return ensureDeferred(run())


class SideBySideTests(DaemonFixture, TestCase):
    """
    Two named instances, each with its own ngrok account (a devcloud each),
    run side by side on one machine and one hosts file.
    """

    def configure(self, devcloud: RunningDevcloud, name: str, hosts: str) -> str:
        """
        The devcloud's config as instance C{name}'s file, with its own socket
        and the shared hosts file.
        """
        return self.own_config(
            self,
            devcloud,
            log_level=f"  log_level: info\n  instance: {name}",
            hosts_file=f"  hosts_file: {hosts}",
        )

    def test_stopOneKeepsTheOther(self) -> Deferred[None]:
        """
        Both serve their own endpoints; stopping one leaves the other
        serving, answering on its socket, with its state in place.
        """

        async def run() -> None:
            hosts = os.path.abspath(self.mktemp())
            with open(hosts, "w") as f:
                f.write("127.0.0.1\tlocalhost\n")
            clouds = [self.start_devcloud(self), self.start_devcloud(self)]
            sockets = [
                self.configure(cloud, name, hosts)
                for cloud, name in zip(clouds, ["team-a", "team-b"], strict=True)
            ]
            a, b = [
                await self.start_daemon(self, cloud, path)
                for cloud, path in zip(clouds, sockets, strict=True)
            ]
            self.assertEqual(
                (a.config.server.instance, b.config.server.instance),
                ("team-a", "team-b"),
            )
            self.assertNotEqual(a.config.server.state_dir, b.config.server.state_dir)
            ports_b = {url: x.spec.port for url, x in b.listeners.listeners.items()}
            await a.stopService()
            self.assertFalse(os.path.exists(sockets[0]))
            self.assertTrue(all(x.listening for x in b.listeners.listeners.values()))
            self.assertEqual(
                {url: x.spec.port for url, x in b.listeners.listeners.items()},
                ports_b,
            )
            ran = await ngrokctl(sockets[1], "status", "-o", "json")
            self.assertEqual(ran.json()["endpoints"], 2)
            state = b.config.server.state_dir
            self.assertTrue(os.path.exists(os.path.join(state, "tls.crt")))
            with open(hosts) as f:
                self.assertEqual(f.read(), "127.0.0.1\tlocalhost\n")

        return ensureDeferred(run())
