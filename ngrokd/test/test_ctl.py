"""
Tests for C{ngrokctl} (L{ngrokd.ctl}) against a running daemon, over its
real control socket.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import getConnectError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ngrokd.control import client
from ngrokd.control.client import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_RESTART,
    EXIT_USAGE,
    EXIT_VERSION,
)
from ngrokd.control.render import duration, endpoint_table, size, status_lines
from ngrokd.ctl import Console, run
from ngrokd.daemon import Daemon
from ngrokd.test.helpers import exchange, ready_status, wait_until
from ngrokd.test.test_control import DaemonFixture, spawn_peer


class Ran:
    """
    What one ngrokctl run printed, and its exit code.
    """

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


async def ngrokctl(
    socket: str, *argv: str, stdin: str = "", environ: dict[str, str] | None = None
) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    console = Console(
        out, err, io.StringIO(stdin), {"NGROKD_SOCKET": socket, **(environ or {})}
    )
    code = await run(reactor, list(argv), console)
    return Ran(code, out.getvalue(), err.getvalue())


class CommandTests(DaemonFixture, TestCase):
    """
    Each command, in both output forms, against a registered daemon.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.socket = os.path.join(self.socket_dir(self), "ngrokd.sock")
        self.daemon: Daemon | None = None

    async def started(self) -> Daemon:
        return await self.start_daemon(self, self.devcloud, self.socket)

    def test_statusWarmConnections(self) -> Deferred[None]:
        """
        After a connection through the daemon, C{status} says how many warm
        connections to the ingress are ready for the next ones.
        """

        async def run() -> None:
            daemon = await self.started()
            (port,) = [
                x.spec.port
                for x in daemon.listeners.listeners.values()
                if x.spec.target.scheme == "tcp"
            ]
            self.assertEqual((await exchange(port, b"hi")).received, b"hi")
            await wait_until(lambda: daemon.connector.pool.ready == 1, "a warm one")
            ran = await ngrokctl(self.socket, "status")
            self.assertIn(
                f"Ingress:      {self.devcloud.ingress_endpoint},"
                " 1 warm connection ready",
                ran.out,
            )
            data = (await ngrokctl(self.socket, "status", "-o", "json")).json()
            self.assertEqual(data["warm_connections"], 1)

        return ensureDeferred(run())

    def test_status(self) -> Deferred[None]:
        """
        C{status} shows the operator, the ingress and the endpoint count
        (where the original's scripts find it with awk); C{-o json} the
        same as data.
        """

        async def run() -> None:
            daemon = await self.started()
            assert daemon.identity is not None
            ran = await ngrokctl(self.socket, "status")
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertIn(
                f"Registered:   yes, operator {daemon.identity.operator_id}", ran.out
            )
            self.assertIn(f"Ingress:      {self.devcloud.ingress_endpoint}", ran.out)
            (endpoints,) = [
                line for line in ran.out.splitlines() if line.startswith("Endpoints:")
            ]
            self.assertEqual(endpoints.split()[1], "2")
            self.assertIn("Ready:        yes", ran.out)
            data = (await ngrokctl(self.socket, "status", "-o", "json")).json()
            self.assertEqual(
                (data["registered"], data["endpoints"], data["ready"]), (True, 2, True)
            )

        return ensureDeferred(run())

    def test_list(self) -> Deferred[None]:
        """
        C{list} has a row per endpoint with where to connect and its state;
        C{-o json} has the rows as data.
        """

        async def run() -> None:
            await self.started()
            ran = await ngrokctl(self.socket, "list")
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            lines = ran.out.splitlines()
            self.assertTrue(lines[0].startswith("URL"))
            (echo,) = [line for line in lines if "tcp://echo.test:7000" in line]
            self.assertIn("listening", echo.split())
            self.assertEqual(lines[-1], "Total: 2 endpoints")
            rows = (await ngrokctl(self.socket, "list", "-o", "json")).json()
            self.assertEqual(
                sorted(row["url"] for row in rows),
                ["http://web.test", "tcp://echo.test:7000"],
            )

        return ensureDeferred(run())

    def test_listFiltered(self) -> Deferred[None]:
        """
        C{list TEXT} and C{--state} keep the rows the web page's filters
        would (found through the daemon's indexes); C{--names} prints each
        hostname once.
        """

        async def run() -> None:
            await self.started()
            rows = (await ngrokctl(self.socket, "list", "ECHO", "-o", "json")).json()
            self.assertEqual([row["url"] for row in rows], ["tcp://echo.test:7000"])
            listening = await ngrokctl(
                self.socket, "list", "--state", "listening", "-o", "json"
            )
            self.assertEqual(len(listening.json()), 2)
            failed = await ngrokctl(self.socket, "list", "--state", "failed")
            self.assertEqual(failed.out, "No endpoint matches.\n")
            names = await ngrokctl(self.socket, "list", "--names")
            self.assertEqual(sorted(names.out.split()), ["echo.test", "web.test"])

        return ensureDeferred(run())

    def test_namesComplete(self) -> Deferred[None]:
        """
        bash, with ngrokctl's completion script, offers the running daemon's
        endpoint names after C{ngrokctl list}.
        """
        from ngrokd.cli import ctl_parser
        from ngrokd.cli.completion import completion_script

        bash = shutil.which("bash")
        if bash is None:
            raise SkipTest("bash is not installed")
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write(completion_script(ctl_parser.parser(), "bash"))
        line = "ngrokctl list w"
        command = (
            f"source {script}\n"
            f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
            f"read -r -a COMP_WORDS <<< {line!r}\n"
            "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
            "_shtab_ngrokctl\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        bin_dir = os.path.dirname(shutil.which("ngrokctl") or sys.executable)
        environ = {
            **os.environ,
            "NGROKD_SOCKET": self.socket,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', os.defpath)}",
        }

        async def run() -> None:
            await self.started()
            out, err, code = await getProcessOutputAndValue(
                bash, ["--norc", "-c", command], env=environ
            )
            self.assertEqual((code, err), (0, b""))
            self.assertEqual(out.split(), [b"web.test"])

        return ensureDeferred(run())

    def test_health(self) -> Deferred[None]:
        """
        C{health} says ready and exits 0.
        """

        async def run() -> None:
            await self.started()
            ran = await ngrokctl(self.socket, "health")
            self.assertEqual((ran.code, ran.out), (EXIT_OK, "ready\n"))
            data = (await ngrokctl(self.socket, "health", "-o", "json")).json()
            self.assertEqual(data, {"ready": True, "not_ready_because": ""})

        return ensureDeferred(run())

    def test_events(self) -> Deferred[None]:
        """
        C{events} shows what happened: each endpoint added, then an endpoint
        removed from ngrok as it happens.
        """

        async def run() -> None:
            daemon = await self.started()
            await wait_until(
                lambda: control_feed(daemon).last_id >= 2, "the first events"
            )
            ran = await ngrokctl(self.socket, "events", "--once")
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertIn("added: tcp://echo.test:7000 added", ran.out)
            following = ensureDeferred(ngrokctl(self.socket, "events", "--tail", "0"))
            self.devcloud.cloud.remove_endpoint("http://web.test")
            daemon.discovery.poll_now()
            await wait_until(
                lambda: any(e.kind == "removed" for e in control_feed(daemon).after(0)),
                "the removal event",
            )
            following.cancel()
            self.failureResultOf(following)

        return ensureDeferred(run())

    def test_eventsJSON(self) -> Deferred[None]:
        """
        C{events -o json} prints one JSON object per event.
        """

        async def run() -> None:
            daemon = await self.started()
            await wait_until(
                lambda: control_feed(daemon).last_id >= 2, "the first events"
            )
            ran = await ngrokctl(self.socket, "events", "--once", "-o", "json")
            events = [json.loads(line) for line in ran.out.splitlines()]
            self.assertIn(
                ("added", "tcp://echo.test:7000"),
                [(e["kind"], e["url"]) for e in events],
            )

        return ensureDeferred(run())

    def test_notRunning(self) -> Deferred[None]:
        """
        With no daemon, each command says so on stderr and exits 3.
        """

        async def run() -> None:
            missing = os.path.join(self.socket_dir(self), "nothing.sock")
            ran = await ngrokctl(missing, "status")
            self.assertEqual(ran.code, EXIT_NOT_RUNNING)
            self.assertEqual(ran.out, "")
            self.assertIn("ngrokd is not running", ran.err)
            self.assertIn(missing, ran.err)

        return ensureDeferred(run())

    def test_versionMismatch(self) -> Deferred[None]:
        """
        A daemon speaking a newer protocol gets a message naming what to
        upgrade, and exit code 6.
        """

        async def run() -> None:
            await self.started()
            self.patch(client, "PROTOCOL_VERSION", 0)
            ran = await ngrokctl(self.socket, "status")
            self.assertEqual(ran.code, EXIT_VERSION)
            self.assertIn("upgrade ngrokctl", ran.err)

        return ensureDeferred(run())


def control_feed(daemon: Daemon) -> Any:
    from ngrokd.control.feed import EventFeed

    (feed,) = [s for s in daemon if isinstance(s, EventFeed)]
    return feed


class APIKeyTests(DaemonFixture, TestCase):
    """
    C{set-api-key} against a daemon that waits for a key.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.socket = os.path.join(self.socket_dir(self), "ngrokd.sock")
        with open(self.devcloud.config_path) as f:
            self.original = f.read()
        key_line = f"  key: {json.dumps(self.devcloud.api_key)}\n"
        self.assertIn(key_line, self.original)
        self.without_key = self.original.replace(key_line, '  key: ""\n')
        self.config = os.path.join(self.devcloud.state_dir, "keyless.yml")
        with open(self.config, "w") as f:
            f.write(self.without_key)

    async def waiting(self) -> Daemon:
        return await self.start_daemon(
            self, self.devcloud, self.socket, self.config, expected=0
        )

    def test_notReadyWithoutKey(self) -> Deferred[None]:
        """
        Without a key, C{health} says why it is not ready and exits 1.
        """

        async def run() -> None:
            await self.waiting()
            ran = await ngrokctl(self.socket, "health")
            self.assertEqual(ran.code, EXIT_FAILED)
            self.assertIn("not ready: not registered, waiting for an API key", ran.out)

        return ensureDeferred(run())

    def test_keyFromStdin(self) -> Deferred[None]:
        """
        A key piped in is tried, used (the daemon registers and serves) and
        saved in the config, whose every other byte stays.
        """

        async def run() -> None:
            daemon = await self.waiting()
            ran = await ngrokctl(
                self.socket, "set-api-key", stdin=self.devcloud.api_key + "\n"
            )
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertIn(f"saved in {self.config}", ran.out)
            self.assertEqual(ran.err, "")
            await wait_until(
                lambda: (
                    sum(x.listening for x in daemon.listeners.listeners.values()) == 2
                ),
                "the endpoints",
            )
            with open(self.config) as f:
                saved = f.read().splitlines()
            before = self.without_key.splitlines()
            self.assertEqual(len(saved), len(before))
            changed = [(a, b) for a, b in zip(before, saved, strict=True) if a != b]
            self.assertEqual(len(changed), 1)
            self.assertIn(self.devcloud.api_key, changed[0][1])

        return ensureDeferred(run())

    def test_readableConfigMadePrivate(self) -> Deferred[None]:
        """
        Saving the key in a config others can read makes it private (0600)
        and tells the user so, on stdout with the rest of the answer.
        """

        async def run() -> None:
            await self.waiting()
            os.chmod(self.config, 0o644)
            ran = await ngrokctl(
                self.socket, "set-api-key", stdin=self.devcloud.api_key + "\n"
            )
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertEqual(
                ran.out,
                f"the API key works and is saved in {self.config}; it let group or"
                " others read or write it (mode 0644): now 0600, as it holds the"
                " key\n",
            )
            self.assertEqual(os.stat(self.config).st_mode & 0o777, 0o600)

        return ensureDeferred(run())

    def test_wrongKey(self) -> Deferred[None]:
        """
        A key ngrok refuses changes nothing: exit 1, the reason on stderr,
        the config untouched.
        """

        async def run() -> None:
            await self.waiting()
            ran = await ngrokctl(self.socket, "set-api-key", stdin="wrong\n")
            self.assertEqual(ran.code, EXIT_FAILED)
            self.assertIn("not accepted", ran.err)
            self.assertNotIn("wrong", ran.err.replace("not accepted", ""))
            with open(self.config) as f:
                self.assertEqual(f.read(), self.without_key)

        return ensureDeferred(run())

    def test_keyArgumentWarns(self) -> Deferred[None]:
        """
        A key on the command line still works, with a warning about ps and
        shell history.
        """

        async def run() -> None:
            await self.waiting()
            ran = await ngrokctl(self.socket, "set-api-key", self.devcloud.api_key)
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertIn("shell history", ran.err)

        return ensureDeferred(run())


#: An editor for the tests: replaces the first line matching argv[1] with
#: argv[2] in the file it is given (the last argument).
_EDITOR = """
import sys
old, new, path = sys.argv[1], sys.argv[2], sys.argv[-1]
with open(path) as f:
    text = f.read()
assert old in text, old
with open(path, "w") as f:
    f.write(text.replace(old, new, 1))
"""


class ConfigEditTests(DaemonFixture, TestCase):
    """
    C{config edit} on the running daemon's config, with a scripted editor
    run as a real program.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.socket = os.path.join(self.socket_dir(self), "ngrokd.sock")
        self.editor = os.path.abspath(self.mktemp())
        with open(self.editor, "w") as f:
            f.write(_EDITOR)
        with open(self.devcloud.config_path) as f:
            self.original = f.read()

    def edit(self, old: str, new: str) -> dict[str, str]:
        return {"VISUAL": f"{sys.executable} {self.editor} '{old}' '{new}'"}

    def test_validEditOfTheDaemonsFile(self) -> Deferred[None]:
        """
        Without C{--config}, the file edited is the running daemon's; a
        valid edit is saved, and only the edited line changes.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.socket)
            ran = await ngrokctl(
                self.socket,
                "config",
                "edit",
                environ=self.edit("log_level: info", "log_level: debug"),
            )
            self.assertEqual(ran.code, EXIT_OK, ran.err)
            self.assertIn("saved", ran.out)
            with open(self.devcloud.config_path) as f:
                self.assertEqual(
                    f.read(),
                    self.original.replace("log_level: info", "log_level: debug"),
                )

        return ensureDeferred(run())

    def test_invalidEditRefused(self) -> Deferred[None]:
        """
        An invalid edit is shown with its file, line and key, and (with no
        terminal to ask on) given up: exit 1, the file as it was.
        """

        async def run() -> None:
            ran = await ngrokctl(
                self.socket,
                "config",
                "edit",
                "--config",
                self.devcloud.config_path,
                environ=self.edit("log_level: info", "log_level: loud"),
            )
            self.assertEqual(ran.code, EXIT_FAILED)
            self.assertIn(f"{self.devcloud.config_path}:", ran.err)
            self.assertIn("server.log_level", ran.err)
            with open(self.devcloud.config_path) as f:
                self.assertEqual(f.read(), self.original)

        return ensureDeferred(run())


class ReloadTests(DaemonFixture, TestCase):
    """
    C{ngrokctl reload}: what it applied, refused, or left for a restart.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.socket = self.own_config(self, self.devcloud)
        with open(self.devcloud.config_path) as f:
            self.original = f.read()

    def save(self, text: str) -> None:
        with open(self.devcloud.config_path, "w") as f:
            f.write(text)

    def test_outcomes(self) -> Deferred[None]:
        """
        No change exits 0; a hot change is applied and named; an invalid
        file exits 1 with the reason and changes nothing; a restart-only
        change exits 7 naming the key.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.socket)
            ran = await ngrokctl(self.socket, "reload")
            self.assertEqual((ran.code, ran.out), (EXIT_OK, "no changes\n"))
            self.save(self.original.replace("log_level: info", "log_level: warn"))
            ran = await ngrokctl(self.socket, "reload")
            self.assertEqual(
                (ran.code, ran.out), (EXIT_OK, "applied: server.log_level\n")
            )
            self.save(self.original.replace("log_level: info", "log_level: loud"))
            ran = await ngrokctl(self.socket, "reload")
            self.assertEqual(ran.code, EXIT_FAILED)
            self.assertIn("not reloaded, nothing changed", ran.err)
            self.assertIn("server.log_level", ran.err)
            self.assertEqual(daemon.config.server.log_level, "warn")
            self.save(self.original.replace("net:\n", "net:\n  subnet: 10.99.0.0/16\n"))
            ran = await ngrokctl(self.socket, "reload")
            self.assertEqual(ran.code, EXIT_RESTART)
            self.assertIn("applied only at a restart: net.subnet", ran.err)

        return ensureDeferred(run())


class ProgramTests(SynchronousTestCase):
    """
    C{python -m ngrokd.ctl} as a program.
    """

    def test_exitCode(self) -> None:
        """
        The program exits with the command's code, its message on stderr.
        """
        ran = subprocess.run(
            [sys.executable, "-m", "ngrokd.ctl", "--socket", "/nonexistent/s", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(ran.returncode, EXIT_NOT_RUNNING, ran.stderr)
        self.assertEqual(ran.stdout, "")
        self.assertIn("ngrokd is not running", ran.stderr)
        self.assertNotIn("Traceback", ran.stderr)


#: An editor that does to the copy it is given what argv[1] says.
_BAD_EDITOR = """
import os, sys
how, path = sys.argv[1], sys.argv[-1]
if how == "latin-1":
    with open(path, "ab") as f:
        f.write("# caf\\u00e9\\n".encode("latin-1"))
elif how == "remove":
    os.unlink(path)
elif how == "fifo":
    os.unlink(path)
    os.mkfifo(path)
"""


class BadInputTests(SynchronousTestCase):
    """
    C{python -m ngrokd.ctl} given what it cannot use: each gets one line
    on stderr and an exit code, never a traceback, and none waits.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config = os.path.join(self.base, "config.yml")
        self.original = "net:\n  start_port: 9080\n"
        with open(self.config, "w") as f:
            f.write(self.original)
        self.editor = os.path.join(self.base, "editor.py")
        with open(self.editor, "w") as f:
            f.write(_BAD_EDITOR)

    def ngrokctl(
        self, *argv: str, stdin: bytes = b"", environ: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        ran = subprocess.run(
            [sys.executable, "-m", "ngrokd.ctl", "--socket", "/nonexistent/s", *argv],
            input=stdin,
            capture_output=True,
            timeout=60,
            env={**os.environ, **(environ or {})},
        )
        return subprocess.CompletedProcess(
            ran.args,
            ran.returncode,
            ran.stdout.decode("utf-8", "replace"),
            ran.stderr.decode("utf-8", "replace"),
        )

    def assertOneLine(self, text: str, start: str) -> None:
        self.assertNotIn("Traceback", text)
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith(start), text)

    def test_keyTooLong(self) -> None:
        """
        A megabyte of key is refused before the daemon is asked: exit 2.
        """
        ran = self.ngrokctl("set-api-key", stdin=b"k" * 2**20 + b"\n")
        self.assertEqual(ran.returncode, EXIT_USAGE, ran.stderr)
        self.assertEqual(
            ran.stderr,
            "ngrokctl: refusing the API key: it is longer than 512 characters\n",
        )

    def test_socketPathTooLong(self) -> None:
        """
        A socket path longer than a UNIX socket's can be is named in one
        line: exit 2, not a traceback and "not running".
        """
        path = "/tmp/" + "s" * 120
        ran = subprocess.run(
            [sys.executable, "-m", "ngrokd.ctl", "--socket", path, "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(ran.returncode, EXIT_USAGE, ran.stderr)
        self.assertOneLine(ran.stderr, f"ngrokctl: {path}: a UNIX socket's path")

    def test_keyNotUTF8(self) -> None:
        """
        A key that is not UTF-8 is refused: exit 2, one line.
        """
        for locale in ("C.UTF-8", "C"):
            ran = self.ngrokctl(
                "set-api-key", stdin=b"caf\xe9-key\n", environ={"LC_ALL": locale}
            )
            self.assertEqual(ran.returncode, EXIT_USAGE, ran.stderr)
            self.assertOneLine(ran.stderr, "ngrokctl: refusing the API key: ")
            self.assertIn("UTF-8", ran.stderr)

    def edit(self, how: str) -> subprocess.CompletedProcess[str]:
        visual = f"{sys.executable} {self.editor} {how}"
        ran = self.ngrokctl(
            "config", "edit", "--config", self.config, environ={"VISUAL": visual}
        )
        self.assertEqual(ran.returncode, EXIT_FAILED, ran.stderr)
        with open(self.config) as f:
            self.assertEqual(f.read(), self.original)
        self.assertEqual(sorted(os.listdir(self.base)), ["config.yml", "editor.py"])
        return ran

    def test_editorWritesLatin1(self) -> None:
        """
        An edit that is not UTF-8 is refused as an invalid edit, with no
        terminal to offer it again on: exit 1, the file as it was.
        """
        ran = self.edit("latin-1")
        self.assertOneLine(ran.stderr, f"ngrokctl: {self.config}: not UTF-8 text")
        self.assertIn("left as it was", ran.stdout)

    def test_editorRemovesTheCopy(self) -> None:
        """
        An editor that removes the copy: exit 1, saying so.
        """
        ran = self.edit("remove")
        self.assertEqual(ran.stderr, "")
        self.assertOneLine(ran.stdout, f"{self.config}: left as it was: the editor")
        self.assertIn("No such file", ran.stdout)

    def test_editorLeavesAFifo(self) -> None:
        """
        An editor that leaves a FIFO in place of the copy: exit 1 at once,
        saying so, and the FIFO is removed.
        """
        ran = self.edit("fifo")
        self.assertEqual(ran.stderr, "")
        self.assertOneLine(ran.stdout, f"{self.config}: left as it was: the editor")
        self.assertIn("not a regular file but a FIFO", ran.stdout)

    def test_configIsAFifo(self) -> None:
        """
        A FIFO at the config's path is refused at once, naming it: exit 1.
        """
        os.unlink(self.config)
        os.mkfifo(self.config)
        ran = self.ngrokctl("config", "edit", "--config", self.config)
        self.assertEqual(ran.returncode, EXIT_FAILED, ran.stderr)
        self.assertEqual(
            ran.stderr,
            f"ngrokctl: {self.config}: cannot read the config file: not a regular"
            " file but a FIFO\n",
        )


class ErrorTests(SynchronousTestCase):
    """
    How connection failures read.
    """

    def test_permissionDenied(self) -> None:
        """
        A socket this user may not open (C{EACCES}, or C{EPERM} from a
        security module) says so, with exit code 4, as Twisted reports the
        failed connect.
        """
        for code in (errno.EACCES, errno.EPERM):
            error = client._connect_error(
                "/run/ngrokd.sock", getConnectError((code, os.strerror(code)))
            )
            self.assertEqual(error.code, EXIT_PERMISSION)
            self.assertIn("permission denied on /run/ngrokd.sock", str(error))


class StrangerTests(DaemonFixture, TestCase):
    """
    C{ngrokctl} run by a user the socket does not let in.
    """

    def test_permissionDenied(self) -> Deferred[None]:
        """
        C{nobody}, not in the socket's group, is told permission is denied
        on the socket, with exit code 4, not that ngrokd is not running.
        """
        if os.geteuid() != 0:
            raise SkipTest("running ngrokctl as nobody needs root")

        async def run() -> None:
            devcloud = self.start_devcloud(self)
            socket = os.path.join(self.socket_dir(self), "ngrokd.sock")
            await self.start_daemon(self, devcloud, socket)
            os.chmod(os.path.dirname(socket), 0o755)
            nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
            status = ["-m", "ngrokd.ctl", "--socket", socket, "status"]
            ngrokctl = spawn_peer(self, status, user=nobody)
            self.assertEqual(await ngrokctl.ended, EXIT_PERMISSION, ngrokctl.err)
            self.assertIn(f"permission denied on {socket}".encode(), ngrokctl.err)

        return ensureDeferred(run())


def _shown(**fields: Any) -> dict[str, Any]:
    """
    A ready daemon's status with C{fields}, as C{ngrokctl status} gets it.
    """
    return {
        **attrs.asdict(ready_status(**fields)),
        "ready": True,
        "registered": True,
        "uptime": 60.0,
        "not_ready_because": "",
    }


class RenderTests(SynchronousTestCase):
    """
    The human forms of numbers and rows.
    """

    def test_units(self) -> None:
        """
        Durations keep their two largest units; sizes stay below 1,024.
        """
        self.assertEqual(
            [duration(s) for s in (0, 59, 61, 3700, 90000)],
            ["0s", "59s", "1m 1s", "1h 1m", "1d 1h"],
        )
        self.assertEqual(
            [size(n) for n in (0, 1023, 1024, 5 * 2**20)],
            ["0 B", "1023 B", "1.0 KiB", "5.0 MiB"],
        )

    def test_stale(self) -> None:
        """
        A daemon serving the list of an earlier run says so.
        """
        status = _shown(stale=True)
        lines = status_lines(status, {"listening": 2})
        self.assertIn(
            "Stale:        serving the endpoints kept from an earlier run until"
            " the API answers",
            lines,
        )
        self.assertNotIn(
            "Stale", "\n".join(status_lines({**status, "stale": False}, {}))
        )

    def test_ipv6(self) -> None:
        """
        C{ngrokctl status} says where the names' IPv6 addresses come from,
        or why there are none; C{ngrokctl list} shows each name's addresses
        in one column and why an endpoint is not on IPv6.
        """
        status = _shown(ipv6_subnet="fd00::/64")
        self.assertIn(
            "IPv6:         names have addresses in fd00::/64",
            status_lines(status, {}),
        )
        self.assertIn(
            "IPv6:         unavailable, names are IPv4 only: no IPv6 here",
            status_lines({**status, "ipv6_error": "no IPv6 here"}, {}),
        )
        self.assertNotIn(
            "IPv6", "\n".join(status_lines({**status, "ipv6_subnet": ""}, {}))
        )
        row = {
            "id": "ep_1",
            "url": "http://web.prod",
            "client_address": "web.prod:80",
            "listen_address": "10.107.0.2:80",
            "mode": "virtual",
            "state": "listening",
            "reason": "",
            "connections_open": 0,
            "connections_total": 0,
            "errors": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "addresses": ["10.107.0.2", "fd00::2"],
            "ipv6_error": "",
        }
        header, line = endpoint_table([row])[:2]
        self.assertEqual(header.split()[-1], "ADDRESSES")
        self.assertEqual(line.split()[-1], "10.107.0.2,fd00::2")
        failed = {
            **row,
            "addresses": ["10.107.0.2"],
            "ipv6_error": "[fd00::2]:80 in use",
        }
        self.assertIn(
            "  http://web.prod: not on IPv6: [fd00::2]:80 in use",
            endpoint_table([failed]),
        )

    def test_reasons(self) -> None:
        """
        A failed endpoint's reason is listed under the table, by URL.
        """
        row = {
            "id": "ep_1",
            "url": "tcp://db.prod:5432",
            "client_address": "",
            "listen_address": "",
            "mode": "",
            "state": "failed",
            "reason": "port 5432 is in use by postgres",
            "connections_open": 0,
            "connections_total": 0,
            "errors": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        lines = endpoint_table([row])
        self.assertIn("  tcp://db.prod:5432: port 5432 is in use by postgres", lines)
        self.assertEqual(lines[-1], "Total: 1 endpoint")
