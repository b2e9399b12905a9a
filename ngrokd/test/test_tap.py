"""
Tests for L{ngrokd.tap} and the twistd plugins.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.control.feed import EventFeed
from ngrokd.control.health import HealthService
from ngrokd.control.server import ControlService
from ngrokd.control.watcher import ConfigWatcher
from ngrokd.daemon import Daemon
from ngrokd.host.memory import MemoryTrimmer
from ngrokd.logs import LogLevelService
from ngrokd.reactor import IDaemonReactor
from ngrokd.signals import StopOnSignal
from ngrokd.tap import Options, makeService

#: C{twistd} as the installed script runs it, in this interpreter.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


class OptionsTests(SynchronousTestCase):
    """
    C{twistd ngrokd --config FILE} loads the configuration up front, so that
    a bad file is a one-line error naming what is wrong.
    """

    def config(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_badConfig(self) -> None:
        """
        An invalid value is refused with the file, line and key.
        """
        path = self.config("bound_endpoints:\n  poll_interval: -5\n")
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertIn(f"{path}:2: bound_endpoints.poll_interval", str(caught.exception))

    def test_missingConfig(self) -> None:
        """
        A config file that does not exist is named in the error.
        """
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertIn(path, str(caught.exception))

    def test_caBundleMissing(self) -> None:
        """
        A CA bundle the config names but that does not exist is refused with
        the file, line and key, before anything is built.
        """
        missing = os.path.abspath(self.mktemp())
        path = self.config(f"api:\n  key: ''\ningress:\n  ca_bundle: {missing}\n")
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertEqual(
            str(caught.exception),
            f"{path}:4: ingress.ca_bundle: cannot read {missing}:"
            " No such file or directory",
        )

    def test_caBundleWithoutCertificate(self) -> None:
        """
        A CA bundle that holds no certificate is refused the same way.
        """
        bundle = self.config("not a certificate\n")
        path = self.config(f"api:\n  ca_bundle: {bundle}\n")
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertEqual(
            str(caught.exception),
            f"{path}:2: api.ca_bundle: {bundle}: no PEM certificate found",
        )

    def test_twistdNamesTheKey(self) -> None:
        """
        C{twistd ngrokd} with a missing CA bundle exits non-zero and its
        last line names the file, line and key, with no traceback.
        """
        missing = os.path.abspath(self.mktemp())
        path = self.config(f"ingress:\n  ca_bundle: {missing}\n")
        run = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "ngrokd", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(run.returncode, 1)
        output = run.stdout + run.stderr
        self.assertNotIn("Traceback", output)
        self.assertTrue(
            output.rstrip().endswith(
                f"{path}:2: ingress.ca_bundle: cannot read"
                f" {missing}: No such file or directory"
            ),
            output,
        )

    def test_makeService(self) -> None:
        """
        The service is the daemon, with the configured log level applied
        and the health server listening while it runs; nothing starts before
        twistd starts it.
        """
        state = os.path.abspath(self.mktemp())
        path = self.config(
            f"server:\n  state_dir: {state}\n  log_level: error\n"
            "  health_address: '[::1]:9999'\n"
            "net:\n  listen_interface: 127.0.0.1\n"
        )
        options = Options()
        options.parseOptions(["--config", path])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        assert isinstance(service, Daemon)
        self.assertFalse(service.running)
        self.assertEqual(
            [type(child) for child in service],
            [LogLevelService, HealthService, EventFeed, ControlService, ConfigWatcher],
        )
        health = service.getServiceNamed("health")
        assert isinstance(health, HealthService)
        self.assertEqual((health.address, reactor.tcpServers), ("[::1]:9999", []))

    def test_healthOff(self) -> None:
        """
        An empty C{server.health_address} builds no health server.
        """
        state = os.path.abspath(self.mktemp())
        path = self.config(f"server:\n  state_dir: {state}\n  health_address: ''\n")
        options = Options()
        options.parseOptions(["--config", path])
        service = makeService(options, MemoryReactorClock())
        assert isinstance(service, Daemon)
        self.assertEqual(
            [type(child) for child in service],
            [LogLevelService, EventFeed, ControlService, ConfigWatcher],
        )

    def test_signalsUnderTwistd(self) -> None:
        """
        Built for twistd (on the global reactor), the daemon also handles
        SIGTERM and SIGINT (once started: building installs nothing), and
        trims its heap after storms.
        """
        state = os.path.abspath(self.mktemp())
        path = self.config(f"server:\n  state_dir: {state}\n  health_address: ''\n")
        options = Options()
        options.parseOptions(["--config", path])
        service = makeService(options)
        assert isinstance(service, Daemon)
        self.assertEqual(
            [type(child) for child in list(service)[-2:]],
            [StopOnSignal, MemoryTrimmer],
        )


class ReactorTests(SynchronousTestCase):
    """
    The reactor twistd runs the daemon on.
    """

    def test_providesWhatTheDaemonAsks(self) -> None:
        """
        The global reactor provides every interface L{IDaemonReactor}
        names, which the daemon takes it for.
        """
        from twisted.internet import reactor

        asked = IDaemonReactor.getBases()
        self.assertEqual(len(asked), 5)
        self.assertEqual([i for i in asked if not i.providedBy(reactor)], [])


class PluginTests(SynchronousTestCase):
    """
    Installing the package makes twistd offer both plugins.
    """

    def test_plugins(self) -> None:
        """
        C{twistd --help} lists C{ngrokd} and C{ngrokd-devcloud}.
        """
        names = {maker.tapname for maker in getPlugins(IServiceMaker)}
        self.assertTrue({"ngrokd", "ngrokd-devcloud"} <= names, names)
