"""
Tests for L{ngrokd.logoutput}: text or JSON lines, the journal's priority
prefixes, twistd's C{--logger} chosen by the config, a real twistd writing
JSON, and every log call of the package a format with named fields.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterator
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import ngrokd
from ngrokd.logoutput import choose, is_journal, json_line, observer_for
from ngrokd.tap import Options
from ngrokd.test.helpers import offline_config, spawn_twistd, wait_until
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

#: Seconds a twistd process gets to start and stop.
PROCESS_TIMEOUT = 30.0


def logged(
    log_format: str, environ: dict[str, str] | None = None, stream: Any = None
) -> tuple[Logger, io.StringIO]:
    """
    A logger whose events go, in C{log_format}, to the returned stream.
    """
    out = stream if stream is not None else io.StringIO()
    publisher = LogPublisher(observer_for(log_format, out, environ or {}))
    return Logger(namespace="ngrokd.test", observer=publisher), out


class JSONLineTests(SynchronousTestCase):
    """
    C{server.log_format: json}: one JSON object a line.
    """

    def test_fieldsLevelNamespaceTime(self) -> None:
        """
        A line holds the event's named fields, its level by name, its
        namespace, its time, its format and the message as text.
        """
        log, out = logged("json")
        log.warn("listening for {url} on {port}", url="http://a.test", port=9080)
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(
            {k: v for k, v in record.items() if k != "log_time"},
            {
                "log_level": "warn",
                "log_namespace": "ngrokd.test",
                "log_format": "listening for {url} on {port}",
                "log_text": "listening for http://a.test on 9080",
                "url": "http://a.test",
                "port": 9080,
            },
        )
        self.assertIsInstance(record["log_time"], float)

    def test_valuesJSONHasNoTypeFor(self) -> None:
        """
        An exception is written as its message, bytes decoded, a set as a
        list, a value that holds itself and one whose text fails as text:
        the line is still valid JSON and the observer stays.
        """

        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no")

        loop: list[object] = []
        loop.append(loop)
        log, out = logged("json")
        log.error(
            "odd values {error}",
            error=ValueError("bad value"),
            data=b"\xffbytes",
            names={"a"},
            nan=float("nan"),
            loop=loop,
            odd=Unprintable(),
        )
        log.info("still here")
        first, second = (json.loads(x) for x in out.getvalue().splitlines())
        self.assertEqual(first["error"], "bad value")
        self.assertEqual(first["log_text"], "odd values bad value")
        self.assertEqual(first["data"], "\\xffbytes")
        self.assertEqual(first["names"], ["a"])
        self.assertEqual(first["nan"], "nan")
        self.assertEqual(first["odd"], "(cannot be shown: RuntimeError)")
        self.assertIsInstance(json.dumps(first["loop"]), str)
        self.assertEqual(second["log_text"], "still here")

    def test_failureTraceback(self) -> None:
        """
        A failure logged with its traceback gives C{log_traceback}, the
        traceback as text.
        """
        log, out = logged("json")
        try:
            raise ZeroDivisionError("by zero")
        except ZeroDivisionError:
            log.failure("dividing {what}", Failure(), LogLevel.error, what="one")
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["log_level"], "error")
        self.assertEqual(record["what"], "one")
        self.assertIn("ZeroDivisionError", record["log_traceback"])
        self.assertIn("Traceback", record["log_traceback"])

    def test_oneLineEach(self) -> None:
        """
        A message with newlines is still one line of JSON.
        """
        self.assertEqual(
            json_line({"log_format": "a\nb {x}", "x": "c\nd"}).count("\n"), 1
        )


class JournalTests(SynchronousTestCase):
    """
    When the output is the journal, every line starts with its priority.
    """

    def journal_file(self) -> tuple[Any, dict[str, str]]:
        """
        A file, and an environment naming it as the journal's stream.
        """
        f = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed at cleanup)
        self.addCleanup(f.close)
        found = os.fstat(f.fileno())
        return f, {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}

    def test_prioritiesByLevel(self) -> None:
        """
        C{<7>} debug, C{<6>} info, C{<4>} warn, C{<3>} error and critical,
        on every line of an event (a traceback's lines too).
        """
        f, environ = self.journal_file()
        log, _ = logged("text", environ, f)
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e\nsecond line")
        log.critical("c")
        f.seek(0)
        lines = f.read().splitlines()
        self.assertEqual(
            [line[:3] for line in lines], ["<7>", "<6>", "<4>", "<3>", "<3>", "<3>"]
        )
        self.assertTrue(lines[0].endswith("[ngrokd.test#debug] d"), lines[0])
        self.assertEqual(lines[4], "<3>\tsecond line")

    def test_jsonToo(self) -> None:
        """
        JSON lines to the journal carry the prefix too; the journal takes it
        off, leaving the JSON.
        """
        f, environ = self.journal_file()
        log, _ = logged("json", environ, f)
        log.warn("w {x}", x=1)
        f.seek(0)
        line = f.read()
        self.assertTrue(line.startswith("<4>{"), line)
        self.assertEqual(json.loads(line[3:])["x"], 1)

    def test_otherStream(self) -> None:
        """
        C{JOURNAL_STREAM} naming another file (the journal was stderr, the
        log goes elsewhere), a malformed one or none: no prefixes.
        """
        f, environ = self.journal_file()
        with tempfile.TemporaryFile("w+") as other:
            self.assertTrue(is_journal(environ, f))
            self.assertFalse(is_journal(environ, other))
            self.assertFalse(is_journal({"JOURNAL_STREAM": "x"}, f))
            self.assertFalse(is_journal({}, f))
            self.assertFalse(is_journal(environ, io.StringIO()))


class ChooseTests(SynchronousTestCase):
    """
    The config's format becomes twistd's C{--logger} unless twistd was told
    to log otherwise.
    """

    def test_foreground(self) -> None:
        """
        In the foreground, logging to the standard output, twistd is given
        the format's factory.
        """
        for logfile in (None, "-"):
            options = {"nodaemon": True, "logfile": logfile, "logger": None}
            choose(options, "json")
            self.assertEqual(options["logger"], "ngrokd.logoutput.json_observer")

    def test_toldOtherwise(self) -> None:
        """
        A C{--logger}, C{--syslog} or C{--logfile} of twistd's, or a
        daemon that forks (and logs to C{twistd.log}), stays as it is.
        """
        for told in (
            {"nodaemon": True, "logger": "my.observer"},
            {"nodaemon": True, "syslog": True},
            {"nodaemon": True, "logfile": "/var/log/ngrokd.log"},
            {"nodaemon": False},
        ):
            options = {"logger": None, **told}
            choose(options, "json")
            self.assertEqual(options["logger"], told.get("logger"))

    def test_theDaemonsOptions(self) -> None:
        """
        The daemon's options, parsed as twistd's subcommand, choose
        twistd's C{--logger} from the config they read.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = offline_config(base, os.path.join(base, "s.sock"))
        with open(config) as f:
            text = f.read().replace("server:\n", "server:\n  log_format: json\n")
        with open(config, "w") as f:
            f.write(text)
        parent: dict[str, Any] = {"nodaemon": True, "logger": None}
        options = Options()
        cast(Any, options).parent = parent
        options.parseOptions(["--config", config])
        self.assertEqual(parent["logger"], "ngrokd.logoutput.json_observer")


def _json_lines(path: str) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)


class TwistdJSONTests(DaemonFixture, TestCase):
    """
    A real C{twistd -n ngrokd} with C{server.log_format: json}.
    """

    def test_jsonLines(self) -> Deferred[None]:
        """
        Every line twistd writes is a JSON object, from twistd's start to
        its stop; the start, the control socket and each listening
        endpoint are events with their named fields.
        """
        devcloud = self.start_devcloud(self)
        socket_path = self.own_config(
            self, devcloud, log_level="  log_level: info\n  log_format: json"
        )
        log = os.path.abspath(self.mktemp())
        process = spawn_twistd(self, devcloud.config_path, log)

        def output() -> str:
            with open(log, errors="replace") as f:
                return f.read()[-3000:]

        async def run() -> None:
            async def listening() -> bool:
                self.assertIsNone(process.poll(), output())
                ran = await ngrokctl(socket_path, "list", "-o", "json")
                rows = ran.json() if ran.code == 0 else []
                return len(rows) == 2 and all(r["state"] == "listening" for r in rows)

            for _ in range(int(PROCESS_TIMEOUT / 0.2)):
                if await listening():
                    break
                await deferLater(reactor, 0.2, lambda: None)
            else:
                self.fail(f"not listening\n{output()}")
            process.terminate()
            await wait_until(lambda: process.poll() is not None, "the stop", 30)
            records = list(_json_lines(log))
            by_format: dict[str, list[dict[str, Any]]] = {}
            for record in records:
                by_format.setdefault(record["log_format"], []).append(record)
            (start,) = by_format["twistd {version} ({exe} {pyVersion}) starting up."]
            self.assertEqual(start["log_level"], "info")
            (control,) = by_format["control socket on {socket}"]
            self.assertEqual(control["socket"], socket_path)
            self.assertEqual(
                control["log_namespace"], "ngrokd.control.server.ControlService"
            )
            listened = by_format["listening for {url} on {address}"]
            self.assertEqual(
                sorted((r["url"], r["address"].split(":")[0]) for r in listened),
                [
                    ("http://web.test:80", "127.0.0.1"),
                    ("tcp://echo.test:7000", "127.0.0.1"),
                ],
            )
            self.assertEqual(records[-1]["log_format"], "Server Shut Down.")

        return ensureDeferred(run())


def _is_logger(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return isinstance(name, str) and name.lower().endswith("log")


#: Logger methods and where their format is among the arguments.
_FORMAT_AT = {
    "debug": 0,
    "info": 0,
    "warn": 0,
    "error": 0,
    "critical": 0,
    "failure": 0,
    "emit": 1,
}


def unstructured_calls(source: str) -> Iterator[tuple[int, str]]:
    """
    The log calls in C{source} whose event loses its structure: a format
    made by an f-string, C{.format} or C{%}, or a literal format that is
    a single field and nothing else (C{"{message}"}).
    """
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _FORMAT_AT
            and _is_logger(node.func.value)
        ):
            continue
        at = _FORMAT_AT[node.func.attr]
        if len(node.args) <= at:
            continue
        fmt = node.args[at]
        made = [
            n
            for n in ast.walk(fmt)
            if isinstance(n, (ast.JoinedStr, ast.Call))
            or (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod))
        ]
        if made:
            yield node.lineno, f"format made at the call: {ast.unparse(fmt)}"
        elif isinstance(fmt, ast.Constant) and isinstance(fmt.value, str):
            parsed = list(string.Formatter().parse(fmt.value))
            fields = [field for _, field, _, _ in parsed if field is not None]
            words = "".join(text for text, _, _, _ in parsed)
            if len(fields) == 1 and not re.search(r"\w", words):
                yield node.lineno, f"a single field and nothing else: {fmt.value!r}"


class StructuredEventsTests(SynchronousTestCase):
    """
    Every log call of the package (the devcloud too) gives a format with
    named fields, so that a JSON log keeps what each event is about.
    """

    def test_checkerFinds(self) -> None:
        """
        The check finds each way an event loses its structure, and passes
        formats with words and fields.
        """
        source = (
            'log.info("{message}", message=m)\n'
            'self.log.warn(f"listening on {port}")\n'
            'self._log.error("on {}".format(port))\n'
            'log.emit(LogLevel.info, "%s" % x)\n'
            'self.log.failure("{error}", failure, error=e)\n'
            'log.info("listening on {port}", port=p)\n'
            'log.error("{error}; {effect}", error=e, effect=f)\n'
            'console.warn(f"not a logger: {x}")\n'
        )
        self.assertEqual([n for n, _ in unstructured_calls(source)], [1, 2, 3, 4, 5])

    def test_package(self) -> None:
        """
        No log call in C{ngrokd/} (tests aside) makes its format at the
        call or logs a lone field.
        """
        root = os.path.dirname(ngrokd.__file__)
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in {"test", "__pycache__"}]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        for line, problem in unstructured_calls(f.read()):
                            found.append(
                                f"{os.path.relpath(path, root)}:{line}: {problem}"
                            )
        self.assertEqual(found, [])


class TwistdJournalTests(TestCase):
    """
    A real C{twistd -n ngrokd} whose output is the journal's stream.
    """

    def test_priorityPrefixes(self) -> Deferred[None]:
        """
        With C{JOURNAL_STREAM} naming its output, every line twistd writes
        starts with the priority of its level: C{<6>} for the start, C{<4>}
        for the warning that no API key is set.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        socket_dir = tempfile.mkdtemp(prefix="ngrokd-journal-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        config = offline_config(base, os.path.join(socket_dir, "ngrokd.sock"))
        log = os.path.join(base, "journal")
        open(log, "w").close()
        found = os.stat(log)
        env = {k: v for k, v in os.environ.items() if k != "NGROK_API_KEY"}
        env["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
        process = spawn_twistd(self, config, log, env=env, cwd=base)

        def lines() -> list[str]:
            with open(log, errors="replace") as f:
                return f.read().splitlines()

        async def run() -> None:
            await wait_until(
                lambda: any("waiting for an API key" in x for x in lines()),
                "the daemon's start",
                PROCESS_TIMEOUT,
            )
            process.terminate()
            await wait_until(lambda: process.poll() is not None, "the stop", 30)
            written = lines()
            self.assertTrue(written)
            self.assertEqual(
                [x for x in written if not re.match(r"<[3467]>", x)], [], written
            )
            (start,) = [x for x in written if "starting up" in x]
            (waiting,) = [x for x in written if "waiting for an API key" in x]
            self.assertEqual((start[:3], waiting[:3]), ("<6>", "<4>"))

        return ensureDeferred(run())
