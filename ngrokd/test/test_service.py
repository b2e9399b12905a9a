"""
Tests for C{ngrokd install|uninstall|start|stop|restart|status}
(L{ngrokd.cli.service}, L{ngrokd.cli.units}) against a temporary root,
with C{systemctl} and C{launchctl} replaced by scripts that record their
arguments (systemd is not PID 1 where tests run), and the written unit
checked by C{systemd-analyze verify}.
"""

from __future__ import annotations

import io
import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from textwrap import dedent

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.cli import daemon_parser
from ngrokd.cli.main import run
from ngrokd.cli.service import EXIT_PERMISSION
from ngrokd.cli.units import protects_home
from ngrokd.control.client import EXIT_NOT_RUNNING
from ngrokd.test.helpers import source_file

#: A manager command that records how it was called, then exits with
#: $FAKE_EXIT (0 by default).
_FAKE = """\
#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_CALLS"
exit "${FAKE_EXIT:-0}"
"""

#: A named instance's config that loads: its own numbers.
_WORK_CONFIG = dedent(
    """\
    server:
      health_address: 127.0.0.1:8082
    net:
      subnet: 10.108.0.0/16
    """
)


#: The command the service runs for the unnamed instance.
DAEMON_COMMAND = [
    sys.executable,
    *("-m", "ngrokd", "run", "--config", "/etc/ngrokd/config.yml"),
]


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


class ServiceFixture:
    """
    A temporary root, a directory of fake manager commands on C{PATH}, and
    C{ngrokd} run against them.
    """

    def setUp(self) -> None:
        case: SynchronousTestCase = self  # type: ignore[assignment]
        self.root = os.path.abspath(case.mktemp())
        os.makedirs(self.root)
        bin_dir = os.path.abspath(case.mktemp())
        os.makedirs(bin_dir)
        for name in ("systemctl", "launchctl"):
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write(_FAKE)
            os.chmod(path, 0o755)
        self.calls_file = os.path.join(bin_dir, "calls")
        sockets = tempfile.mkdtemp(prefix="ngrokd-service-")
        case.addCleanup(shutil.rmtree, sockets, True)
        self.environ = {
            "PATH": f"{bin_dir}:{os.defpath}",
            "FAKE_CALLS": self.calls_file,
            # Short (a UNIX socket path has at most 107 bytes), and unused.
            "NGROKD_SOCKET": os.path.join(sockets, "no-daemon.sock"),
        }

    def systemd_runs(self) -> None:
        os.makedirs(self.at("/run/systemd/system"))

    def at(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path: str) -> str:
        with open(self.at(path)) as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(self.at(path)), exist_ok=True)
        with open(self.at(path), "w") as f:
            f.write(text)

    def calls(self) -> list[str]:
        if not os.path.exists(self.calls_file):
            return []
        with open(self.calls_file) as f:
            return f.read().splitlines()

    def ngrokd(
        self,
        *argv: str,
        euid: int = 0,
        interpreter: str = sys.executable,
        prefix: str = sys.prefix,
        platform: str = "linux",
    ) -> Ran:
        out, err = io.StringIO(), io.StringIO()
        code = run(
            [*argv, "--root", self.root],
            self.environ,
            out,
            err,
            euid,
            interpreter=interpreter,
            prefix=prefix,
            platform=platform,
        )
        return Ran(code, out.getvalue(), err.getvalue())


def verify(case: SynchronousTestCase, path: str) -> None:
    """
    C{systemd-analyze verify} finds nothing to say about the unit at C{path}.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise SkipTest("systemd-analyze is not installed")
    ran = subprocess.run(
        [analyze, "verify", path],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    case.assertEqual((ran.returncode, ran.stdout + ran.stderr), (0, ""))


def directives(unit: str) -> list[str]:
    """
    The unit's settings and section headers, comments and blanks left out.
    """
    return [
        line
        for line in unit.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def exec_start(unit: str) -> list[str]:
    (line,) = re.findall(r"(?m)^ExecStart=(.*)$", unit)
    return shlex.split(line)


class SystemdInstallTests(ServiceFixture, SynchronousTestCase):
    """
    C{ngrokd install} for systemd.
    """

    def test_install(self) -> None:
        """
        C{install} writes contrib's hardened unit running this installation's
        Python on the daemon, a config of mode 0600 (every key at its
        default) in a directory of mode 0700, reloads systemd and enables
        the unit, and says what it wrote and what to do next.
        """
        self.systemd_runs()
        ran = self.ngrokd("install")
        self.assertEqual(ran.code, 0, ran.err)
        unit = self.read("/etc/systemd/system/ngrokd.service")
        verify(self, self.at("/etc/systemd/system/ngrokd.service"))
        command = exec_start(unit)
        self.assertEqual(
            command,
            DAEMON_COMMAND,
        )
        args = daemon_parser.parse(command[3:])
        self.assertEqual((args.command, args.config), ("run", "/etc/ngrokd/config.yml"))
        with open(source_file("contrib", "systemd", "ngrokd.service")) as f:
            contrib = f.read()
        changed = {"ExecStart", "SyslogIdentifier"}
        self.assertEqual(
            [d for d in directives(unit) if d.split("=")[0] not in changed],
            [d for d in directives(contrib) if d.split("=")[0] not in changed],
        )
        self.assertIn("\nType=notify\n", unit)
        self.assertIn("\nProtectHome=yes\n", unit)
        config = self.at("/etc/ngrokd/config.yml")
        self.assertEqual(stat.S_IMODE(os.stat(config).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(config)).st_mode), 0o700)
        with open(source_file("contrib", "config.yml")) as f:
            self.assertEqual(self.read("/etc/ngrokd/config.yml"), f.read())
        self.assertEqual(
            self.calls(),
            ["systemctl daemon-reload", "systemctl enable ngrokd.service"],
        )
        self.assertIn(f"wrote {self.at('/etc/systemd/system/ngrokd.service')}", ran.out)
        self.assertIn(f"wrote {config} (mode 0600)", ran.out)
        self.assertIn("sudo ngrokd start\n", ran.out)
        self.assertIn("ngrokctl set-api-key", ran.out)

    def test_againChangesNothing(self) -> None:
        """
        A second C{install} leaves both files as they are and says so.
        """
        self.systemd_runs()
        self.assertEqual(self.ngrokd("install").code, 0)
        self.write("/etc/ngrokd/config.yml", "api:\n  key: kept\n")
        ran = self.ngrokd("install")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertIn("already as this installation writes it", ran.out)
        self.assertIn("kept", ran.out)
        self.assertEqual(self.read("/etc/ngrokd/config.yml"), "api:\n  key: kept\n")

    def test_changedUnitNeedsForce(self) -> None:
        """
        A unit that differs from what this installation writes is left as
        it is, with the difference shown and C{--force} named; C{--force}
        replaces it, but never the config file.
        """
        self.assertEqual(self.ngrokd("install").code, 0)
        path = "/etc/systemd/system/ngrokd.service"
        edited = self.read(path).replace("RestartSec=5s", "RestartSec=1s")
        self.write(path, edited)
        self.write("/etc/ngrokd/config.yml", "api:\n  key: mine\n")
        ran = self.ngrokd("install")
        self.assertEqual(ran.code, 1)
        self.assertEqual(self.read(path), edited)
        self.assertIn(f"{self.at(path)} differs", ran.err)
        self.assertIn("--force", ran.err)
        self.assertIn("-RestartSec=1s\n+RestartSec=5s", ran.err)
        ran = self.ngrokd("install", "--force")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertIn("RestartSec=5s", self.read(path))
        self.assertEqual(self.read("/etc/ngrokd/config.yml"), "api:\n  key: mine\n")

    def test_refusedWithoutRoot(self) -> None:
        """
        Without root, C{install} and the commands that change the service
        write nothing, ask nothing of systemd and say to use sudo;
        C{status} needs no root.
        """
        self.systemd_runs()
        for command in ("install", "uninstall", "start", "stop", "restart"):
            ran = self.ngrokd(command, euid=1000)
            self.assertEqual(ran.code, EXIT_PERMISSION, command)
            self.assertIn("needs root", ran.err)
            self.assertIn(f"sudo ngrokd {command}", ran.err)
        self.assertFalse(os.path.exists(self.at("/etc")))
        self.assertEqual(self.calls(), [])

    def test_systemdNotRunning(self) -> None:
        """
        Where systemd is not running (a container), C{install} writes the
        files, asks systemd nothing and says how to run the daemon instead;
        C{start} refuses, saying the same.
        """
        ran = self.ngrokd("install")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertTrue(os.path.exists(self.at("/etc/systemd/system/ngrokd.service")))
        self.assertIn("systemd is not running here", ran.out)
        self.assertIn("'ngrokd run'", ran.out)
        ran = self.ngrokd("start")
        self.assertEqual(ran.code, 1)
        self.assertIn("systemd is not running here", ran.err)
        self.assertEqual(self.calls(), [])

    def test_namedInstance(self) -> None:
        """
        A named instance needs its config first (it sets its own numbers);
        then its unit runs the daemon with C{--instance}, under names of its
        own.
        """
        self.systemd_runs()
        ran = self.ngrokd("install", "--instance", "work")
        self.assertEqual(ran.code, 1)
        self.assertIn(
            f"{self.at('/etc/ngrokd/work/config.yml')} does not exist", ran.err
        )
        self.assertFalse(os.path.exists(self.at("/etc/systemd")))
        self.write("/etc/ngrokd/work/config.yml", _WORK_CONFIG)
        ran = self.ngrokd("install", "--instance", "work")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertNotIn("will not start", ran.err)
        path = "/etc/systemd/system/ngrokd-work.service"
        verify(self, self.at(path))
        unit = self.read(path)
        self.assertEqual(
            exec_start(unit)[1:],
            ["-m", "ngrokd", "run", "--config", "/etc/ngrokd/work/config.yml"]
            + ["--instance", "work"],
        )
        for line in (
            "SyslogIdentifier=ngrokd-work",
            "RuntimeDirectory=ngrokd-work",
        ):
            self.assertIn(f"\n{line}\n", unit)
        self.assertRegex(unit, r"\nDescription=.*\(instance work\)\n")
        self.assertEqual(
            self.calls(),
            ["systemctl daemon-reload", "systemctl enable ngrokd-work.service"],
        )
        self.assertIn("sudo ngrokd start --instance work", ran.out)

    def test_invalidConfigWarned(self) -> None:
        """
        An existing config the daemon would refuse is kept, and named with
        its fault.
        """
        self.write("/etc/ngrokd/config.yml", "bound_endpoints:\n  poll_interval: -5\n")
        ran = self.ngrokd("install")
        self.assertEqual(ran.code, 0)
        self.assertIn("the daemon will not start with this config", ran.err)
        self.assertIn("poll_interval", ran.err)

    def test_unusualInterpreterPath(self) -> None:
        """
        An interpreter whose path holds a space and systemd's specifier and
        variable characters is the very file the unit runs.
        """
        directory = os.path.join(os.path.abspath(self.mktemp()), "my venv %i $HOME")
        os.makedirs(directory)
        interpreter = os.path.join(directory, "python")
        os.symlink(sys.executable, interpreter)
        self.assertEqual(self.ngrokd("install", interpreter=interpreter).code, 0)
        path = self.at("/etc/systemd/system/ngrokd.service")
        verify(self, path)
        with open(path) as f:
            (line,) = re.findall(r"(?m)^ExecStart=(.*)$", f.read())
        self.assertTrue(
            line.startswith(f'"{directory.replace("%", "%%")}/python" -m ngrokd run'),
            line,
        )

    def test_homeInstallation(self) -> None:
        """
        An installation in a home directory (pipx as a user) gets
        C{ProtectHome=read-only}, which leaves its code visible to the
        service; one others than root can change is warned about.
        """
        prefix = os.path.abspath(self.mktemp())
        os.makedirs(prefix)
        os.chown(prefix, 1000, 1000)
        ran = self.ngrokd(
            "install",
            interpreter="/home/u/.local/share/pipx/venvs/ngrokd/bin/python",
            prefix=prefix,
        )
        self.assertEqual(ran.code, 0, ran.err)
        unit = self.read("/etc/systemd/system/ngrokd.service")
        self.assertIn("\nProtectHome=read-only\n", unit)
        self.assertNotIn("ProtectHome=yes", unit)
        self.assertIn(f"{prefix} can be changed by others than root", ran.err)


class HomeTests(SynchronousTestCase):
    """
    L{protects_home}: which installations C{ProtectHome=yes} would hide.
    """

    def test_homes(self) -> None:
        """
        Paths in /home, /root and /run/user are hidden; others, names that
        only begin alike included, are not.
        """
        for hidden in ("/home/u/.local/bin/python", "/root/venv", "/run/user/1000/x"):
            self.assertFalse(protects_home(["/usr/bin/python3", hidden]), hidden)
        for seen in ("/opt/pipx/venvs/ngrokd", "/homeless/venv", "/rooted/x", "/usr"):
            self.assertTrue(protects_home([seen]), seen)


class SystemdControlTests(ServiceFixture, SynchronousTestCase):
    """
    C{start}, C{stop}, C{restart}, C{status} and C{uninstall} for systemd.
    """

    def setUp(self) -> None:
        super().setUp()
        self.systemd_runs()
        self.assertEqual(self.ngrokd("install").code, 0)
        os.remove(self.calls_file)

    def test_startStopRestart(self) -> None:
        """
        Each runs its systemctl command on the unit.
        """
        for command in ("start", "stop", "restart"):
            ran = self.ngrokd(command)
            self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(
            self.calls(),
            [
                "systemctl start ngrokd.service",
                "systemctl stop ngrokd.service",
                "systemctl restart ngrokd.service",
            ],
        )

    def test_failureReported(self) -> None:
        """
        A failed systemctl fails the command, naming what failed.
        """
        self.environ["FAKE_EXIT"] = "1"
        ran = self.ngrokd("start")
        self.assertEqual(ran.code, 1)
        self.assertIn("systemctl start ngrokd.service failed", ran.err)

    def test_notInstalled(self) -> None:
        """
        A command on an instance not installed says how to install it.
        """
        ran = self.ngrokd("start", "--instance", "work")
        self.assertEqual(ran.code, 1)
        self.assertIn("ngrokd-work.service is not installed", ran.err)
        self.assertIn("sudo ngrokd install --instance work", ran.err)
        self.assertEqual(self.calls(), [])

    def test_status(self) -> None:
        """
        C{status} shows systemd's view, then asks the daemon itself
        (ngrokctl status): here none answers, and its exit status says so.
        """
        ran = self.ngrokd("status")
        self.assertEqual(self.calls(), ["systemctl status --no-pager ngrokd.service"])
        self.assertEqual(ran.code, EXIT_NOT_RUNNING, ran.err)
        self.assertIn("ngrokd is not running", ran.err)

    def test_uninstall(self) -> None:
        """
        C{uninstall} stops and disables the unit, removes it and reloads
        systemd, keeping the config and state; C{--purge} removes those.
        """
        self.write("/etc/ngrokd/tls.key", "key")
        ran = self.ngrokd("uninstall")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertFalse(os.path.exists(self.at("/etc/systemd/system/ngrokd.service")))
        self.assertEqual(
            self.calls(),
            ["systemctl disable --now ngrokd.service", "systemctl daemon-reload"],
        )
        self.assertTrue(os.path.exists(self.at("/etc/ngrokd/tls.key")))
        self.assertIn("--purge", ran.out)
        self.write("/etc/ngrokd/work/config.yml", _WORK_CONFIG)
        ran = self.ngrokd("uninstall", "--purge")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(os.listdir(self.at("/etc/ngrokd")), ["work"])
        self.assertEqual(self.read("/etc/ngrokd/work/config.yml"), _WORK_CONFIG)
        ran = self.ngrokd("uninstall", "--purge", "--instance", "work")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(os.listdir(self.at("/etc/ngrokd")), [])


class LaunchdTests(ServiceFixture, SynchronousTestCase):
    """
    The same commands for launchd (macOS).
    """

    def test_installAndControl(self) -> None:
        """
        C{install} writes contrib's job running this installation's Python
        on the daemon; the other commands bootstrap, boot out and kick it.
        """
        self.write("/sbin/launchd", "")
        ran = self.ngrokd("install", platform="darwin")
        self.assertEqual(ran.code, 0, ran.err)
        path = "/Library/LaunchDaemons/com.ngrok.ngrokd.plist"
        with open(self.at(path), "rb") as f:
            job = plistlib.load(f)
        with open(
            source_file("contrib", "launchd", "com.ngrok.ngrokd.plist"), "rb"
        ) as f:
            contrib = plistlib.load(f)
        self.assertEqual(
            job["ProgramArguments"],
            DAEMON_COMMAND,
        )
        self.assertEqual(
            {k: v for k, v in job.items() if k != "ProgramArguments"},
            {k: v for k, v in contrib.items() if k != "ProgramArguments"},
        )
        for command in ("start", "restart", "stop"):
            self.assertEqual(self.ngrokd(command, platform="darwin").code, 0)
        self.assertEqual(
            self.calls(),
            [
                f"launchctl bootstrap system {path}",
                "launchctl kickstart -k system/com.ngrok.ngrokd",
                "launchctl bootout system/com.ngrok.ngrokd",
            ],
        )

    def test_namedInstance(self) -> None:
        """
        A named instance's job has a label and a log of its own.
        """
        self.write("/etc/ngrokd/work/config.yml", _WORK_CONFIG)
        ran = self.ngrokd(
            "install", "--instance", "work", "--service-manager", "launchd"
        )
        self.assertEqual(ran.code, 0, ran.err)
        with open(
            self.at("/Library/LaunchDaemons/com.ngrok.ngrokd.work.plist"), "rb"
        ) as f:
            job = plistlib.load(f)
        self.assertEqual(job["Label"], "com.ngrok.ngrokd.work")
        self.assertEqual(job["StandardOutPath"], "/var/log/ngrokd-work.log")
        self.assertEqual(job["ProgramArguments"][-2:], ["--instance", "work"])
