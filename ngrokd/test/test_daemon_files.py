"""
The daemon's files are read and written off the reactor thread: the CA
bundles, allocations and last good list at start, and the identity when it
registers, renews and starts again, with the real L{Daemon} against the
devcloud on loopback. What the daemon does when they cannot be read.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from ngrokd.config import SUBNET6_AUTO, Config, load_config
from ngrokd.daemon import Daemon
from ngrokd.devcloud.tap import OPERATORS_FILE, RunningDevcloud, start_devcloud
from ngrokd.host import ula
from ngrokd.host.allocation import IP_MAPPINGS
from ngrokd.host.ula import GLOBAL_ID_FILE
from ngrokd.ngrok.identity_service import REGISTERED
from ngrokd.ngrok.lastgood import LAST_GOOD
from ngrokd.startfiles import read_start_files
from ngrokd.test.helpers import Echo, free_ports, listen, wait_listening, wait_until
from ngrokd.test.threads import BlockingCalls


class DaemonFilesTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        echo = listen(Factory.forProtocol(Echo), self)
        self.state = os.path.abspath(self.mktemp())
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            self.state,
            [("tcp://echo.test:7000", ("127.0.0.1", echo))],
            start_port=free_ports(4),
        )
        self.addCleanup(self.devcloud.stop)
        self.config: Config = load_config(self.devcloud.config_path).config
        api_ca, ingress_ca = self.config.api.ca_bundle, self.config.ingress.ca_bundle
        assert api_ca is not None and ingress_ca is not None
        self.api_ca, self.ingress_ca = api_ca, ingress_ca

    def ours(self, path: str) -> bool:
        """
        Whether C{path} is one of the daemon's files: in its state directory
        (which the devcloud shares, and writes its operators to) or a CA
        bundle it was given.
        """
        return (
            path.startswith(self.state + os.sep)
            and os.path.basename(path) != OPERATORS_FILE
        ) or path in (self.api_ca, self.ingress_ca)

    async def start(self) -> Daemon:
        daemon = Daemon(self.config, reactor)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        await wait_listening(daemon, 1)
        return daemon

    def test_offTheReactorThread(self) -> Deferred[None]:
        """
        Starting (registering), renewing the certificate, stopping and
        starting again (loading the identity, the IPv6 block's global ID,
        the allocations and the last good list) read and write every file
        in another thread than the reactor's.
        """

        async def run() -> None:
            calls = BlockingCalls(self, self.ours)
            daemon = await self.start()
            await daemon.identity_service.renew_now()
            await daemon.stopService()
            again = await self.start()
            self.assertEqual(again.identity_service.state, REGISTERED)
            await again.stopService()
            done = {(c.function, os.path.basename(c.path)) for c in calls.calls}
            expected = {
                ("read_regular", os.path.basename(self.api_ca)),
                ("read_regular", os.path.basename(self.ingress_ca)),
                ("read_if_exists", IP_MAPPINGS),
                ("read_if_exists", GLOBAL_ID_FILE),
                ("read_regular", LAST_GOOD),
                ("read_if_exists", "tls.key"),
                ("write_atomic", "tls.key"),
                ("write_atomic", "tls.key.new"),
                ("replace_durably", "tls.key.new"),
                ("write_atomic", "tls.crt"),
                ("write_atomic", "operator_id"),
            }
            self.assertEqual(expected - done, set())
            self.assertEqual(calls.on_reactor_thread(), [])

        return ensureDeferred(run())

    def test_newGlobalIDNotSavedByReading(self) -> None:
        """
        Reading the start's files with C{net.subnet6: auto} and no global ID
        saved derives the IPv6 block from a new one, returned to be saved
        with the allocations: reading writes nothing. Once saved, it is
        read back, and no new one is made.
        """
        config = attrs.evolve(
            self.config, net=attrs.evolve(self.config.net, subnet6=SUBNET6_AUTO)
        )
        first = read_start_files(config)
        new = first.new_global_id
        assert new is not None
        self.assertEqual(first.subnet6, ula.derive(new))
        state_dir = config.server.state_dir
        self.assertFalse(os.path.exists(os.path.join(state_dir, GLOBAL_ID_FILE)))
        ula.save(state_dir, new)
        again = read_start_files(config)
        self.assertEqual((again.subnet6, again.new_global_id), (first.subnet6, None))

    def test_unreadableCABundle(self) -> Deferred[None]:
        """
        A CA bundle that cannot be read at start (it changed after the
        config was checked) is a problem status shows, naming the file; the
        daemon keeps running, registers nothing and serves nothing, and
        stops cleanly.
        """

        async def run() -> None:
            with open(self.api_ca, "w") as f:
                f.write("not a certificate\n")
            daemon = Daemon(self.config, reactor)
            daemon.startService()
            self.addCleanup(daemon.stopService)
            await wait_until(lambda: bool(daemon.problems.current()), "a problem")
            (problem,) = daemon.problems.current()
            self.assertIn(self.api_ca, problem.error)
            self.assertIn("no PEM certificate", problem.error)
            self.assertFalse(daemon.daemon_status().ready)
            self.assertIsNone(daemon.identity_service.parent)
            self.assertEqual(self.devcloud.cloud.operators(), [])
            await daemon.stopService()
            self.assertFalse(daemon.state_lock.held)

        return ensureDeferred(run())

    def test_stoppedWhileReading(self) -> Deferred[None]:
        """
        A daemon stopped before its files are read waits for the read,
        then starts nothing of what needed them: no interface, hosts file
        or identity, so nothing registers.
        """

        async def run() -> None:
            daemon = Daemon(self.config, reactor)
            daemon.startService()
            # The read's result can only arrive once the reactor runs again.
            await daemon.stopService()
            self.assertEqual(
                [daemon.interface.parent, daemon.hosts.parent],
                [None, None],
            )
            self.assertIsNone(daemon.identity_service.parent)
            self.assertFalse(daemon.state_lock.held)
            self.assertEqual(self.devcloud.cloud.operators(), [])

        return ensureDeferred(run())
