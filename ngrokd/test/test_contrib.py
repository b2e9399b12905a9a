"""
Tests for what contrib/ ships: the systemd units, the launchd job, the
container image and the example configuration. Each runs or parses what an
operator's tools would.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys

import yaml
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.config import default_config, load_config
from ngrokd.reconfigure import settings
from ngrokd.tap import DEFAULT_CONFIG
from ngrokd.test.helpers import source_file


def twistd_command(case: SynchronousTestCase, argv: list[str]) -> ServerOptions:
    """
    C{argv} (from C{twistd} on) parsed as twistd parses it, with the file
    after C{--config} replaced by a valid one (the real one is not here).
    """
    executable, *arguments = argv
    case.assertEqual(os.path.basename(executable), "twistd")
    index = arguments.index("--config") + 1
    case.assertEqual(arguments[index], DEFAULT_CONFIG)
    arguments[index] = source_file("contrib", "config.yml")
    options = ServerOptions()
    options.parseOptions(arguments)
    return options


class SystemdTests(SynchronousTestCase):
    """
    C{contrib/systemd}: C{ngrokd.service} and C{ngrokd.socket}.
    """

    def unit(self, name: str) -> str:
        with open(source_file("contrib", "systemd", name)) as f:
            return f.read()

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing to say about either unit.
        C{ExecStart}'s bare C{twistd} (found in systemd's search path where
        installed) is this environment's for the check.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        service = self.unit("ngrokd.service")
        self.assertIn("\nExecStart=twistd ", service)
        with open(os.path.join(directory, "ngrokd.service"), "w") as f:
            f.write(service.replace("\nExecStart=twistd ", f"\nExecStart={twistd} "))
        with open(os.path.join(directory, "ngrokd.socket"), "w") as f:
            f.write(self.unit("ngrokd.socket"))
        ran = subprocess.run(
            [
                analyze,
                "verify",
                os.path.join(directory, "ngrokd.service"),
                os.path.join(directory, "ngrokd.socket"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((ran.returncode, ran.stdout + ran.stderr), (0, ""))

    def test_command(self) -> None:
        """
        The service runs the daemon in the foreground, without a pid file,
        as a notify service that HUP reloads.
        """
        service = self.unit("ngrokd.service")
        (exec_start,) = re.findall(r"^ExecStart=(.*)$", service, re.M)
        options = twistd_command(self, shlex.split(exec_start))
        self.assertEqual(options.subCommand, "ngrokd")
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertIn("\nType=notify\n", service)
        self.assertIn("\nExecReload=/bin/kill -HUP $MAINPID\n", service)


class LaunchdTests(SynchronousTestCase):
    """
    C{contrib/launchd/com.ngrok.ngrokd.plist}.
    """

    def test_job(self) -> None:
        """
        The job parses as launchd reads it and runs the daemon in the
        foreground (launchd supervises it), started at load, kept alive.
        """
        with open(
            source_file("contrib", "launchd", "com.ngrok.ngrokd.plist"), "rb"
        ) as f:
            job = plistlib.load(f)
        self.assertEqual(job["Label"], "com.ngrok.ngrokd")
        options = twistd_command(self, list(job["ProgramArguments"]))
        self.assertEqual(options.subCommand, "ngrokd")
        self.assertTrue(options["nodaemon"])
        self.assertTrue(job["RunAtLoad"])
        self.assertTrue(job["KeepAlive"])


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """
    The Dockerfile's instructions, continuation lines joined, comments out.
    """
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


class DockerTests(SynchronousTestCase):
    """
    C{contrib/docker/Dockerfile}, read without a Docker daemon.
    """

    def setUp(self) -> None:
        with open(source_file("contrib", "docker", "Dockerfile")) as f:
            self.instructions = dockerfile_instructions(f.read())
        self.top = os.path.dirname(os.path.dirname(source_file("contrib", "docker")))

    def of(self, keyword: str) -> list[str]:
        return [rest for found, rest in self.instructions if found == keyword]

    def test_copySources(self) -> None:
        """
        Everything the image copies from the checkout exists in it.
        """
        copies = self.of("COPY")
        self.assertTrue(copies)
        for rest in copies:
            *sources, _ = rest.split()
            for source in sources:
                self.assertTrue(os.path.exists(os.path.join(self.top, source)), source)

    def test_configuration(self) -> None:
        """
        The image's configuration loads, serves health on every address in
        network mode, and takes the API key from C{NGROK_API_KEY}.
        """
        path = source_file("contrib", "docker", "config.yml")
        config = load_config(path, environ={"NGROK_API_KEY": "k"}).config
        self.assertEqual(config.server.health_address, "0.0.0.0:8081")
        self.assertEqual(config.net.listen_interface, "0.0.0.0")
        self.assertEqual(config.api.key, "k")
        copied = [rest.split() for rest in self.of("COPY")]
        self.assertIn(["contrib/docker/config.yml", DEFAULT_CONFIG], copied)

    def test_runsAsUserWithHealthCheck(self) -> None:
        """
        The image runs the daemon as an unprivileged user, in the
        foreground, and its health check asks C{/healthz} on the configured
        port.
        """
        (user,) = self.of("USER")
        self.assertNotIn(user, ("root", "0"))
        (check,) = self.of("HEALTHCHECK")
        self.assertIn("http://127.0.0.1:8081/healthz", check)
        (entrypoint,) = self.of("ENTRYPOINT")
        (cmd,) = self.of("CMD")
        options = twistd_command(self, json.loads(entrypoint) + json.loads(cmd))
        self.assertEqual(options.subCommand, "ngrokd")
        self.assertTrue(options["nodaemon"])


class ExampleConfigTests(SynchronousTestCase):
    """
    C{contrib/config.yml}, the configuration with every key.
    """

    def test_everyKey(self) -> None:
        """
        Every key the daemon reads is in the example, with its default.
        """
        path = source_file("contrib", "config.yml")
        with open(path) as f:
            document = yaml.safe_load(f)
        defaults = settings(default_config(DEFAULT_CONFIG, {}, sys.platform).config)
        missing = []
        for key in defaults:
            node = document
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(key)
                    break
                node = node[part]
        self.assertEqual(missing, [])
        shown = settings(load_config(path, environ={}, platform="linux").config)
        linux = settings(default_config(DEFAULT_CONFIG, {}, "linux").config)
        self.assertEqual(shown, linux)
