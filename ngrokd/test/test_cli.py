"""
Tests for the command lines (L{ngrokd.cli}): the C{ngrokd} script running
the daemon as a real process, options before or after a command, the
versions, and the completion scripts run by real shells.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import OpenSSL
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import twisted
from ngrokd import __main__ as as_module
from ngrokd import __version__
from ngrokd.cli import ctl_parser, daemon_parser
from ngrokd.cli.completion import completion_script
from ngrokd.cli.foreground import twistd_arguments
from ngrokd.cli.main import main
from ngrokd.cli.main import run as ngrokd_main
from ngrokd.cli.options import anywhere, misplaced
from ngrokd.cli.version import version_text
from ngrokd.control.client import EXIT_USAGE
from ngrokd.test.helpers import source_file, spawn
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

#: Seconds a child process gets to answer.
PROCESS_TIMEOUT = 30.0


def script(name: str) -> str:
    """
    The console script C{name} installed beside this Python.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        raise AssertionError(f"{path} is not installed: reinstall the package")
    return path


class UsageError(Exception):
    """
    argparse refused a command line, with this message.
    """


def parsed(parse: Any, case: SynchronousTestCase, *argv: str) -> Any:
    """
    C{argv} parsed by C{parse}; L{UsageError} with argparse's message when
    refused.
    """
    err = io.StringIO()
    case.patch(sys, "stderr", err)
    try:
        return parse(list(argv))
    except SystemExit as e:
        raise UsageError(err.getvalue()) from e


class CtlOptionsTests(SynchronousTestCase):
    """
    ngrokctl's options before or after the command.
    """

    def ctl(self, *argv: str) -> Any:
        return parsed(ctl_parser.parse, self, *argv)

    def test_configBeforeOrAfter(self) -> None:
        """
        C{ngrokctl --config F diagnose} (which said C{invalid choice: 'F'})
        means C{ngrokctl diagnose --config F}.
        """
        for argv in (["--config", "F", "diagnose"], ["diagnose", "--config", "F"]):
            args = self.ctl(*argv)
            self.assertEqual((args.command, args.config), ("diagnose", "F"), argv)
        self.assertEqual(self.ctl("--config", "F", "config", "edit").config, "F")

    def test_outputBeforeOrAfter(self) -> None:
        """
        C{-o json} is taken before or after a read command; a table when
        not given.
        """
        self.assertEqual(self.ctl("-o", "json", "list").output, "json")
        self.assertEqual(self.ctl("list", "-o", "json").output, "json")
        self.assertEqual(self.ctl("--output=json", "status").output, "json")
        self.assertEqual(self.ctl("health").output, "table")

    def test_socketAndInstanceAfter(self) -> None:
        """
        C{--socket} and C{--instance} are taken after the command as before.
        """
        args = self.ctl("status", "--socket", "/s", "--instance", "work")
        self.assertEqual((args.socket, args.instance), ("/s", "work"))
        args = self.ctl("--socket", "/s", "events", "--once")
        self.assertEqual((args.socket, args.once), ("/s", True))

    def test_misplacedSaysWhere(self) -> None:
        """
        An option given to a command it means nothing to is refused, before
        or after the command, naming the commands it belongs to.
        """
        for argv in (["-o", "json", "reload"], ["reload", "-o", "json"]):
            error = self.assertRaises(UsageError, self.ctl, *argv)
            self.assertIn(
                "-o/--output is for diagnose, events, health, list and status,"
                " not reload",
                str(error),
            )
        error = self.assertRaises(UsageError, self.ctl, "--config", "F", "status")
        self.assertIn("--config is for config and diagnose, not status", str(error))

    def test_misplacedOnlyWhenGiven(self) -> None:
        """
        An option nobody gave, or one that applies everywhere, is never
        misplaced.
        """
        import argparse

        options = (
            anywhere("--socket"),
            anywhere("-o", "--output", applies={"list"}),
        )
        given = argparse.Namespace(socket="/s", output=None)
        self.assertIsNone(misplaced(options, "reload", given))
        given.output = "json"
        self.assertIsNone(misplaced(options, "list", given))
        self.assertEqual(
            misplaced(options, "reload", given), "-o/--output is for list, not reload"
        )

    def test_usageExitCode(self) -> None:
        """
        ngrokctl exits 2 on a misplaced option, as on any usage error.
        """
        self.patch(sys, "stderr", io.StringIO())

        async def run() -> Any:
            return await ngrokctl("/nonexistent/s", "-o", "json", "reload")

        ran = self.successResultOf(ensureDeferred(run()))
        self.assertEqual(ran.code, EXIT_USAGE)


class DaemonOptionsTests(SynchronousTestCase):
    """
    C{ngrokd}'s command line.
    """

    def ngrokd(self, *argv: str) -> Any:
        return parsed(daemon_parser.parse, self, *argv)

    def test_runByDefault(self) -> None:
        """
        C{ngrokd} with only options runs the daemon, as the Go ngrokd's
        units say it: C{--config=F}, C{--config F} and Go's C{-config=F}.
        """
        for argv in (
            ["--config=/etc/ngrokd/config.yml"],
            ["--config", "/etc/ngrokd/config.yml"],
            ["-config=/etc/ngrokd/config.yml"],
            ["run", "--config=/etc/ngrokd/config.yml"],
            ["-c", "/etc/ngrokd/config.yml", "run"],
        ):
            args = self.ngrokd(*argv)
            self.assertEqual(
                (args.command, args.config, args.instance),
                ("run", "/etc/ngrokd/config.yml", None),
                argv,
            )
        self.assertEqual(self.ngrokd("--instance", "work").instance, "work")

    def test_serviceCommands(self) -> None:
        """
        The service commands take C{--instance} before or after their name;
        C{--config} belongs to C{run} alone.
        """
        args = self.ngrokd("--instance", "work", "install", "--force")
        self.assertEqual(
            (args.command, args.instance, args.force), ("install", "work", True)
        )
        self.assertEqual(self.ngrokd("start", "-i", "work").instance, "work")
        error = self.assertRaises(UsageError, self.ngrokd, "-c", "F", "install")
        self.assertIn("-c/--config is for run, not install", str(error))

    def test_rootFromEnvironment(self) -> None:
        """
        C{--root} defaults to C{$NGROKD_ROOT}, then C{/}.
        """
        self.assertEqual(daemon_parser.parse(["install"], {}).root, "/")
        args = daemon_parser.parse(["install"], {"NGROKD_ROOT": "/tmp/r"})
        self.assertEqual(args.root, "/tmp/r")


class VersionTests(SynchronousTestCase):
    """
    C{--version} of both programs, as installed.
    """

    def test_versions(self) -> None:
        """
        C{ngrokd --version} and C{ngrokctl --version} name the package's
        version and the Twisted, pyOpenSSL and OpenSSL they run with.
        """
        openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        for name in ("ngrokd", "ngrokctl"):
            ran = subprocess.run(
                [script(name), "--version"],
                capture_output=True,
                text=True,
                timeout=PROCESS_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            self.assertEqual(ran.returncode, 0, ran.stderr)
            self.assertEqual(ran.stdout, version_text(name) + "\n")
            first, second = ran.stdout.splitlines()
            self.assertEqual(first, f"{name} {__version__}")
            for part in (
                f"Twisted {twisted.__version__}",
                f"pyOpenSSL {OpenSSL.__version__}",
                openssl,
            ):
                self.assertIn(part, second)


class ModuleTests(SynchronousTestCase):
    """
    C{python -m ngrokd}, which the installed service runs.
    """

    def test_sameProgram(self) -> None:
        """
        C{python -m ngrokd} is the C{ngrokd} console script's program.
        """
        self.assertIs(as_module.main, main)
        ran = subprocess.run(
            [sys.executable, "-m", "ngrokd", "--version"],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(
            (ran.returncode, ran.stdout), (0, version_text("ngrokd") + "\n")
        )


class ForegroundTests(DaemonFixture, TestCase):
    """
    The C{ngrokd} script runs the daemon as C{twistd -n ngrokd} does.
    """

    def test_goStyleCommandLine(self) -> Deferred[None]:
        """
        C{ngrokd --config=FILE}, as a Go ngrokd unit runs it, serves the
        endpoints and answers ngrokctl; SIGTERM stops it and it ends by that
        signal, as twistd's daemon does.
        """
        devcloud = self.start_devcloud(self)
        socket_path = self.own_config(self, devcloud)
        log = os.path.abspath(self.mktemp())
        process = spawn(
            self, [script("ngrokd"), f"--config={devcloud.config_path}"], log
        )

        def output() -> str:
            with open(log, errors="replace") as f:
                return f.read()[-3000:]

        async def run() -> None:
            deadline = time.monotonic() + PROCESS_TIMEOUT
            while True:
                self.assertLess(time.monotonic(), deadline, output())
                self.assertIsNone(process.poll(), output())
                ran = await ngrokctl(socket_path, "list", "-o", "json")
                rows = ran.json() if ran.code == 0 else []
                if len(rows) == 2 and all(r["state"] == "listening" for r in rows):
                    break
                await deferLater(reactor, 0.2, lambda: None)
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + PROCESS_TIMEOUT
            while process.poll() is None:
                self.assertLess(time.monotonic(), deadline, "no exit after SIGTERM")
                await deferLater(reactor, 0.1, lambda: None)
            self.assertEqual(process.returncode, -signal.SIGTERM, output())

        return ensureDeferred(run())

    def test_asTheUnitRunsTwistd(self) -> None:
        """
        C{ngrokd run --config FILE} hands twistd the very arguments the
        unit in C{contrib/} gives it.
        """
        with open(source_file("contrib", "systemd", "ngrokd.service")) as f:
            (line,) = re.findall(r"(?m)^ExecStart=(.*)$", f.read())
        program, *arguments = shlex.split(line)
        self.assertEqual(program, "twistd")
        self.assertEqual(twistd_arguments("/etc/ngrokd/config.yml", None), arguments)

    def test_badConfigOneLine(self) -> None:
        """
        A config file that cannot be read ends C{ngrokd} with status 1 and
        one line naming it, not twistd's whole usage.
        """
        missing = os.path.abspath(self.mktemp())
        ran = subprocess.run(
            [script("ngrokd"), "--config", missing],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(ran.returncode, 1)
        self.assertEqual(ran.stdout, "")
        (line,) = ran.stderr.splitlines()
        self.assertTrue(line.startswith(f"ngrokd: {missing}: "), line)


def shell(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SkipTest(f"{name} is not installed")
    return found


class CompletionTests(SynchronousTestCase):
    """
    The completion scripts, loaded and asked by the shells themselves.
    """

    def script(self, program: str, shell_name: str) -> str:
        """
        The completion script C{program completion SHELL} prints, in a file.
        """
        out = io.StringIO()
        if program == "ngrokd":
            code = ngrokd_main(["completion", shell_name], {}, out, io.StringIO(), 0)
        else:

            async def run() -> Any:
                return await ngrokctl("/nonexistent/s", "completion", shell_name)

            ran = self.successResultOf(ensureDeferred(run()))
            code, out = ran.code, io.StringIO(ran.out)
        self.assertEqual(code, 0)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        name = {"bash": program, "zsh": f"_{program}", "fish": f"{program}.fish"}
        path = os.path.join(directory, name[shell_name])
        with open(path, "w") as f:
            f.write(out.getvalue())
        return path

    def bash_complete(
        self, program: str, line: str, path: str | None = None, cwd: str | None = None
    ) -> list[str]:
        """
        What bash offers for C{line} (the word being typed last) with the
        program's completion script (or the one at C{path}) loaded.
        """
        path = path or self.script(program, "bash")
        command = (
            f"source {path}\n"
            f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
            f"read -r -a COMP_WORDS <<< {line!r}\n"
            + ('COMP_WORDS+=("")\n' if line.endswith(" ") else "")
            + "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
            f"_shtab_{program}\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        ran = subprocess.run(
            [shell("bash"), "--norc", "-c", command],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
        self.assertEqual((ran.returncode, ran.stderr), (0, ""))
        return ran.stdout.split()

    def test_bash(self) -> None:
        """
        bash completes both programs' commands, their options, and the
        choices of C{-o}.
        """
        self.assertEqual(self.bash_complete("ngrokctl", "ngrokctl sta"), ["status"])
        self.assertEqual(
            sorted(self.bash_complete("ngrokctl", "ngrokctl list -o ")),
            ["json", "table"],
        )
        self.assertIn(
            "--config", self.bash_complete("ngrokctl", "ngrokctl diagnose --")
        )
        self.assertEqual(self.bash_complete("ngrokd", "ngrokd ins"), ["install"])
        self.assertIn("--force", self.bash_complete("ngrokd", "ngrokd install --"))

    def test_configCompletesFiles(self) -> None:
        """
        The value of C{--config} completes as a file name.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "work.yml"), "w"):
            pass
        path = os.path.join(directory, "completion.bash")
        with open(path, "w") as f:
            f.write(completion_script(ctl_parser.parser(), "bash"))
        offered = self.bash_complete(
            "ngrokctl", "ngrokctl diagnose --config w", path, directory
        )
        self.assertEqual(offered, ["work.yml"])

    def test_fish(self) -> None:
        """
        fish completes ngrokctl's commands and ngrokd's, with their help.
        """
        fish = shell("fish")
        for program, line, expected in (
            ("ngrokctl", "ngrokctl sta", "status"),
            ("ngrokd", "ngrokd unins", "uninstall"),
        ):
            path = self.script(program, "fish")
            ran = subprocess.run(
                [fish, "--no-config", "-c", f"source {path}; complete -C{line!r}"],
                capture_output=True,
                text=True,
                timeout=PROCESS_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            self.assertEqual((ran.returncode, ran.stderr), (0, ""))
            self.assertEqual(
                [row.split("\t")[0] for row in ran.stdout.splitlines()], [expected]
            )

    def test_zsh(self) -> None:
        """
        zsh reads both scripts, and compinit registers each for its program
        from a directory of C{$fpath}.
        """
        zsh = shell("zsh")
        for program in ("ngrokctl", "ngrokd"):
            path = self.script(program, "zsh")
            command = (
                f"fpath=({os.path.dirname(path)} $fpath)\n"
                "autoload -Uz compinit && compinit -u -D\n"
                f"print -r -- $_comps[{program}]\n"
            )
            ran = subprocess.run(
                [zsh, "-f", "-c", command],
                capture_output=True,
                text=True,
                timeout=PROCESS_TIMEOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HOME": os.path.dirname(path)},
            )
            self.assertEqual(
                (ran.returncode, ran.stdout.strip(), ran.stderr), (0, f"_{program}", "")
            )
            checked = subprocess.run([zsh, "-n", path], capture_output=True, text=True)
            self.assertEqual((checked.returncode, checked.stderr), (0, ""))
