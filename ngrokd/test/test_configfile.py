"""
Tests for L{ngrokd.control.configfile}: real files in a temporary directory
and, for C{config edit}, a scripted editor run as a real process.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from collections.abc import Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.config import ConfigError, parse_config
from ngrokd.control.configfile import (
    EditResult,
    Outcome,
    edit_config,
    editor_command,
    store_api_key,
    validate_config,
)
from ngrokd.test.helpers import source_file

KEY = "2xYzSecretKey_0123"

#: An editor: applies the next step of the JSON plan named by --plan to the
#: file it is given, and records what it saw.
EDITOR = """\
import json, os, stat, sys
plan_path = sys.argv[sys.argv.index("--plan") + 1]
target = sys.argv[-1]
with open(plan_path) as f:
    plan = json.load(f)
seen_path = plan_path + ".seen"
seen = json.load(open(seen_path)) if os.path.exists(seen_path) else []
step = plan[len(seen)]
with open(target) as f:
    text = f.read()
seen.append({
    "argv": sys.argv[1:],
    "text": text,
    "mode": stat.S_IMODE(os.stat(target).st_mode),
})
with open(seen_path, "w") as f:
    json.dump(seen, f)
if "replace" in step:
    old, new = step["replace"]
    assert old in text, old
    with open(target, "w") as f:
        f.write(text.replace(old, new))
if "append" in step:
    with open(target, "ab") as f:
        f.write(bytes.fromhex(step["append"]))
if step.get("remove"):
    os.unlink(target)
if step.get("fifo"):
    os.unlink(target)
    os.mkfifo(target)
sys.exit(step.get("exit", 0))
"""


def _contrib_config() -> bytes:
    """
    The example configuration shipped in contrib/, from the source tree.
    """
    with open(source_file("contrib", "config.yml"), "rb") as f:
        return f.read()


class _Files(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "config.yml")

    def write(self, data: bytes | str, mode: int = 0o600) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(self.path, "wb") as f:
            f.write(data)
        os.chmod(self.path, mode)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def assertOnlyConfigLeft(self) -> None:
        self.assertEqual(os.listdir(self.directory), ["config.yml"])


class StoreApiKeyTests(_Files):
    """
    L{store_api_key} changes the key and nothing else.
    """

    def assertStored(self, before: str, after: str, key: str = KEY) -> None:
        self.write(before)
        store_api_key(self.path, key)
        self.assertEqual(self.read().decode("utf-8"), after)
        loaded = parse_config(after, self.path, {}, "linux")
        self.assertEqual(loaded.config.api.key, key)
        self.assertOnlyConfigLeft()

    def test_contribConfig(self) -> None:
        """
        In the commented example config, only the key's line changes.
        """
        original = _contrib_config()
        self.write(original)
        store_api_key(self.path, KEY)
        before = original.decode("utf-8").splitlines(keepends=True)
        after = self.read().decode("utf-8").splitlines(keepends=True)
        self.assertEqual(len(after), len(before))
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        self.assertEqual(changed, [('  key: ""\n', f'  key: "{KEY}"\n')])

    def test_crlf(self) -> None:
        """
        A file with CRLF line endings keeps them, and every other line.
        """
        original = _contrib_config().replace(b"\n", b"\r\n")
        self.write(original)
        store_api_key(self.path, KEY)
        before = original.split(b"\r\n")
        after = self.read().split(b"\r\n")
        self.assertEqual(len(after), len(before))
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        self.assertEqual(changed, [(b'  key: ""', f'  key: "{KEY}"'.encode())])
        self.assertNotIn(b"\n", self.read().replace(b"\r\n", b""))

    def test_crlfAddedLines(self) -> None:
        """
        Lines added to a CRLF file end in CRLF too.
        """
        self.assertStored(
            "server:\r\n  log_level: info\r\napi:\r\n",
            f'server:\r\n  log_level: info\r\napi:\r\n  key: "{KEY}"\r\n',
        )
        self.assertStored(
            "server:\r\n  log_level: info\r\n",
            f'server:\r\n  log_level: info\r\napi:\r\n  key: "{KEY}"\r\n',
        )

    def test_layoutKept(self) -> None:
        """
        A file indented by four spaces, with extra spaces after colons and
        comments on the key's line, keeps all of it: only the value changes.
        """
        self.assertStored(
            "api:\n"
            "    url: http://api.example   # ours\n"
            "    key:   old-key  # from the dashboard\n"
            "net:\n"
            "    overrides:\n"
            "        db.prod:    '0.0.0.0'\n",
            "api:\n"
            "    url: http://api.example   # ours\n"
            f'    key:   "{KEY}"  # from the dashboard\n'
            "net:\n"
            "    overrides:\n"
            "        db.prod:    '0.0.0.0'\n",
        )

    def test_allDigits(self) -> None:
        """
        A key of digits only is written quoted, so it is read back as the
        same string (unquoted, it would be a number and lose a leading 0).
        """
        self.assertStored(
            "api:\n  key: x\n", 'api:\n  key: "0123456789"\n', "0123456789"
        )

    def test_emptyKey(self) -> None:
        """
        C{key:} with no value (and a comment) gets the value.
        """
        self.assertStored(
            "api:\n  key:   # later\n", f'api:\n  key: "{KEY}"   # later\n'
        )

    def test_noApiSection(self) -> None:
        """
        A file without C{api} gets the section at its end, indented as the
        file's other sections.
        """
        self.assertStored(
            "# mine\nserver:\n    log_level: debug\n",
            f'# mine\nserver:\n    log_level: debug\napi:\n    key: "{KEY}"\n',
        )

    def test_emptyApiSection(self) -> None:
        """
        An empty C{api:} gets the key as its first line; its comment stays.
        """
        self.assertStored(
            "api:   # to do\nnet:\n  start_port: 9090\n",
            f'api:   # to do\n  key: "{KEY}"\nnet:\n  start_port: 9090\n',
        )
        self.assertStored("api: ~\n", f'api:\n  key: "{KEY}"\n')

    def test_apiWithoutKey(self) -> None:
        """
        In an C{api} section without a key, the key goes right under
        C{api:}, so the comments above other keys stay with them.
        """
        self.assertStored(
            "api:\n  # our server\n  url: http://api.example\n",
            f'api:\n  key: "{KEY}"\n  # our server\n  url: http://api.example\n',
        )

    def test_flowApi(self) -> None:
        """
        An C{api} written in flow style gets the key inside its braces.
        """
        self.assertStored(
            "api: {url: 'http://x.example'}\n",
            f"api: {{key: \"{KEY}\", url: 'http://x.example'}}\n",
        )
        self.assertStored("api: {}\n", f'api: {{key: "{KEY}"}}\n')

    def test_blockScalar(self) -> None:
        """
        A key written as a block scalar is replaced without eating the blank
        line after it.
        """
        self.assertStored(
            "api:\n  key: |\n    old\n\n  url: http://x.example\n",
            f'api:\n  key: "{KEY}"\n\n  url: http://x.example\n',
        )

    def test_commentsOnly(self) -> None:
        """
        A file of comments, without a final newline, gets the section after
        them.
        """
        self.assertStored("# nothing yet", f'# nothing yet\napi:\n  key: "{KEY}"\n')

    def test_modeTightened(self) -> None:
        """
        A file group or others could read loses their access once it holds
        the key, and the former mode is returned to be told; a private one
        stays as it was.
        """
        for mode, former, after in ((0o644, 0o644, 0o600), (0o600, None, 0o600)):
            self.write("api:\n  key: old\n", mode)
            self.assertEqual(store_api_key(self.path, KEY), former)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), after)

    def test_symlinkKept(self) -> None:
        """
        A config that is a symbolic link stays one: the key is written to
        the file it points to, which keeps its owner, and nothing is left
        beside either.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.mkdir(elsewhere)
        target = os.path.join(elsewhere, "managed.yml")
        with open(target, "w") as f:
            f.write("api:\n  key: old\n")
        os.chmod(target, 0o600)
        os.symlink(target, self.path)
        store_api_key(self.path, KEY)
        self.assertEqual(os.readlink(self.path), target)
        with open(target) as f:
            self.assertEqual(f.read(), f'api:\n  key: "{KEY}"\n')
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        self.assertOnlyConfigLeft()
        self.assertEqual(os.listdir(elsewhere), ["managed.yml"])

    def test_ownerKept(self) -> None:
        """
        A file root rewrites keeps its owner and group.
        """
        if os.getuid() != 0:
            raise SkipTest("only root can give a file to another user")
        self.write("api:\n  key: old\n", 0o640)
        os.chown(self.path, 65534, 65533)
        store_api_key(self.path, KEY)
        info = os.stat(self.path)
        self.assertEqual((info.st_uid, info.st_gid), (65534, 65533))

    def assertRefused(self, text: str, *expected: str, key: str = KEY) -> None:
        self.write(text)
        e = self.assertRaises(ConfigError, store_api_key, self.path, key)
        for part in expected:
            self.assertIn(part, str(e))
        if key:
            self.assertNotIn(key, str(e))
        self.assertEqual(self.read(), text.encode())
        self.assertOnlyConfigLeft()

    def test_invalidYaml(self) -> None:
        """
        A file that is not YAML is refused, naming it and the line, never
        the key, and left as it is.
        """
        self.assertRefused(
            "api:\n  url: x\n  key: 'unfinished\n", f"{self.path}:", "not valid YAML"
        )

    def test_apiNotMapping(self) -> None:
        """
        An C{api} that is a list or a string is refused.
        """
        self.assertRefused("api: [a, b]\n", f"{self.path}:1: api: must be a mapping")
        self.assertRefused("api: yes\n", f"{self.path}:1: api: must be a mapping")
        self.assertRefused("- a\n", f"{self.path}:1: the file must be a mapping")

    def test_otherSettingsWouldChange(self) -> None:
        """
        When replacing the value would change another setting (here an
        alias to the old key), the file is refused rather than changed.
        """
        self.assertRefused(
            "api:\n  key: &k old\nbackup: *k\n", "without changing other settings"
        )

    def test_badKey(self) -> None:
        """
        An empty key, one with a line break or a byte that was not UTF-8,
        and a megabyte of key, are refused, without showing them.
        """
        self.assertRefused("api:\n  key: old\n", "unprintable", key="abc\ndef")
        self.assertRefused("api:\n  key: old\n", "not UTF-8", key="abc\udcffdef")
        self.assertRefused("api:\n  key: old\n", "empty", key="")
        self.assertRefused("api:\n  key: old\n", "longer than 512", key="k" * 2**20)

    def test_fifo(self) -> None:
        """
        A FIFO at the config's path is refused at once, naming it.
        """
        os.mkfifo(self.path)
        e = self.assertRaises(ConfigError, store_api_key, self.path, KEY)
        self.assertEqual(
            str(e),
            f"{self.path}: cannot read the config file: not a regular file but a FIFO",
        )


class EditorCommandTests(SynchronousTestCase):
    """
    L{editor_command} finds the user's editor as the shell would run it.
    """

    def test_order(self) -> None:
        """
        C{$VISUAL} comes first, then C{$EDITOR}, then C{vi}; blank ones
        do not count.
        """
        self.assertEqual(editor_command({"VISUAL": "nano", "EDITOR": "ed"}), ["nano"])
        self.assertEqual(editor_command({"VISUAL": " ", "EDITOR": "ed"}), ["ed"])
        self.assertEqual(editor_command({}), ["vi"])

    def test_arguments(self) -> None:
        """
        Editors with arguments and quoted paths are split as by a shell.
        """
        self.assertEqual(editor_command({"EDITOR": "code --wait"}), ["code", "--wait"])
        self.assertEqual(
            editor_command({"VISUAL": "'/opt/my editor/bin/ed' -nw"}),
            ["/opt/my editor/bin/ed", "-nw"],
        )

    def test_unbalancedQuote(self) -> None:
        """
        A variable that is not a command line is an error naming it.
        """
        e = self.assertRaises(ValueError, editor_command, {"VISUAL": "'emacs -nw"})
        self.assertIn("$VISUAL", str(e))


class ValidateConfigTests(SynchronousTestCase):
    """
    L{validate_config} is the daemon's own check of a config.
    """

    def test_valid(self) -> None:
        self.assertIsNone(validate_config("net:\n  start_port: 9090\n", "/c.yml"))

    def test_invalid(self) -> None:
        """
        The error names the file, line and key.
        """
        error = validate_config("net:\n  start_port: 99999\n", "/c.yml")
        self.assertEqual(
            error, "/c.yml:2: net.start_port: must be a port number 1..65535, got 99999"
        )

    def test_missingCABundle(self) -> None:
        """
        A CA bundle that does not exist is refused, as at the daemon's start.
        """
        missing = os.path.abspath(self.mktemp())
        error = validate_config(f"ingress:\n  ca_bundle: {missing}\n", "/c.yml")
        self.assertEqual(
            error,
            f"/c.yml:2: ingress.ca_bundle: cannot read {missing}:"
            " No such file or directory",
        )


class EditConfigTests(_Files):
    """
    L{edit_config} replaces the file only with a copy that validates, with
    a scripted editor run as a real process.
    """

    ORIGINAL = "# ours\nnet:\n  start_port: 9080   # first port\n"

    def setUp(self) -> None:
        super().setUp()
        tools = os.path.abspath(self.mktemp())
        os.mkdir(tools)
        self.script = os.path.join(tools, "editor.py")
        with open(self.script, "w") as f:
            f.write(EDITOR)
        self.plan = os.path.join(tools, "plan.json")
        self.questions: list[str] = []
        self.write(self.ORIGINAL, 0o640)

    def edit(
        self, *steps: dict[str, object], again: bool = True, editor: Sequence[str] = ()
    ) -> EditResult:
        with open(self.plan, "w") as f:
            json.dump(steps, f)

        def ask_again(error: str) -> bool:
            self.questions.append(error)
            return again

        editor = editor or [sys.executable, self.script, "--plan", self.plan]
        result = edit_config(self.path, editor, validate_config, ask_again)
        self.assertOnlyConfigLeft()
        return result

    def seen(self) -> list[dict[str, object]]:
        with open(self.plan + ".seen") as f:
            seen: list[dict[str, object]] = json.load(f)
        return seen

    def test_valid(self) -> None:
        """
        A valid edit replaces the file, which keeps its mode. The editor
        was given a private copy in the file's directory.
        """
        result = self.edit({"replace": ["9080", "9090"]})
        self.assertEqual(result, EditResult(Outcome.SAVED, self.path))
        self.assertEqual(result.message, f"{self.path}: saved")
        self.assertEqual(self.read().decode(), self.ORIGINAL.replace("9080", "9090"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        [seen] = self.seen()
        self.assertEqual(seen["mode"], 0o600)
        self.assertEqual(seen["text"], self.ORIGINAL)
        assert isinstance(seen["argv"], list)
        self.assertEqual(os.path.dirname(seen["argv"][-1]), self.directory)
        self.assertEqual(self.questions, [])

    def test_invalidThenFixed(self) -> None:
        """
        An invalid edit is shown and offered again; the second round starts
        from the user's edited copy, and its fix is saved.
        """
        result = self.edit(
            {"replace": ["9080", "99999"]}, {"replace": ["99999", "9443"]}
        )
        self.assertEqual(result.outcome, Outcome.SAVED)
        self.assertEqual(
            self.questions,
            [
                f"{self.path}:3: net.start_port: must be a port number 1..65535,"
                " got 99999"
            ],
        )
        self.assertIn("start_port: 99999", self.seen()[1]["text"])
        self.assertEqual(self.read().decode(), self.ORIGINAL.replace("9080", "9443"))

    def test_givenUp(self) -> None:
        """
        Declining to edit again leaves the file as it was, and says why.
        """
        result = self.edit({"replace": ["9080", "99999"]}, again=False)
        self.assertEqual(result.outcome, Outcome.ABANDONED)
        self.assertEqual(result.error, self.questions[0])
        self.assertIn("left as it was", result.message)
        self.assertIn("net.start_port", result.message)
        self.assertEqual(self.read().decode(), self.ORIGINAL)

    def test_unchanged(self) -> None:
        """
        Leaving the copy as it was writes nothing: the file is not replaced.
        """
        before = os.stat(self.path)
        result = self.edit({})
        self.assertEqual(result, EditResult(Outcome.UNCHANGED, self.path))
        self.assertEqual(result.message, f"{self.path}: no changes")
        self.assertEqual(os.stat(self.path).st_ino, before.st_ino)

    def test_editorFails(self) -> None:
        """
        An editor that exits non-zero (vim's :cq) discards even a valid
        edit, and its status is reported.
        """
        result = self.edit({"replace": ["9080", "9090"], "exit": 3})
        self.assertEqual(
            result, EditResult(Outcome.EDITOR_FAILED, self.path, editor_status=3)
        )
        self.assertIn("status 3", result.message)
        self.assertEqual(self.read().decode(), self.ORIGINAL)

    def test_editorMissing(self) -> None:
        """
        An editor that cannot be run is reported by name.
        """
        result = self.edit(editor=[os.path.join(self.directory, "no-such-editor")])
        self.assertEqual(result.outcome, Outcome.EDITOR_FAILED)
        self.assertIn("cannot run", result.message)
        self.assertIn("no-such-editor", result.message)

    def test_editorWithArguments(self) -> None:
        """
        An editor from C{$VISUAL} with arguments gets them, then the copy.
        """
        visual = shlex.join(
            [sys.executable, self.script, "--flag", "--plan", self.plan]
        )
        editor = editor_command({"VISUAL": visual})
        result = self.edit({"replace": ["9080", "9090"]}, editor=editor)
        self.assertEqual(result.outcome, Outcome.SAVED)
        argv = self.seen()[0]["argv"]
        assert isinstance(argv, list)
        self.assertEqual(argv[:3], ["--flag", "--plan", self.plan])
        self.assertEqual(len(argv), 4)

    def test_ownerKept(self) -> None:
        """
        A file root edits keeps its owner and group.
        """
        if os.getuid() != 0:
            raise SkipTest("only root can give a file to another user")
        os.chown(self.path, 65534, 65533)
        self.edit({"replace": ["9080", "9090"]})
        info = os.stat(self.path)
        self.assertEqual((info.st_uid, info.st_gid), (65534, 65533))

    def test_symlinkKept(self) -> None:
        """
        A config that is a symbolic link stays one: the edit is saved in the
        file it points to, which keeps its mode.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.mkdir(elsewhere)
        target = os.path.join(elsewhere, "managed.yml")
        os.rename(self.path, target)
        os.symlink(target, self.path)
        result = self.edit({"replace": ["9080", "9090"]})
        self.assertEqual(result.outcome, Outcome.SAVED)
        self.assertEqual(os.readlink(self.path), target)
        with open(target) as f:
            self.assertEqual(f.read(), self.ORIGINAL.replace("9080", "9090"))
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o640)
        self.assertEqual(os.listdir(elsewhere), ["managed.yml"])

    def test_notUTF8(self) -> None:
        """
        A copy the editor left not UTF-8 is an invalid edit: offered again,
        and the file is left as it was.
        """
        result = self.edit({"append": "ff0a"}, again=False)
        self.assertEqual(result.outcome, Outcome.ABANDONED)
        self.assertEqual(
            self.questions,
            [f"{self.path}: not UTF-8 text: invalid start byte at byte 46"],
        )
        self.assertEqual(self.read().decode(), self.ORIGINAL)

    def test_copyRemoved(self) -> None:
        """
        An editor that removes the copy ends the edit, saying so.
        """
        result = self.edit({"remove": True})
        self.assertEqual(result.outcome, Outcome.EDITOR_FAILED)
        self.assertIn("the editor left no file to read at", result.message)
        self.assertIn("No such file or directory", result.message)
        self.assertEqual(self.read().decode(), self.ORIGINAL)

    def test_copyLeftAsFifo(self) -> None:
        """
        An editor that leaves a FIFO in place of the copy ends the edit at
        once (reading it would wait forever), and the FIFO is removed.
        """
        result = self.edit({"fifo": True})
        self.assertEqual(result.outcome, Outcome.EDITOR_FAILED)
        self.assertIn("not a regular file but a FIFO", result.message)
        self.assertEqual(self.read().decode(), self.ORIGINAL)

    def test_copyRemovedOnError(self) -> None:
        """
        The copy is removed even when validation fails unexpectedly.
        """

        def validate(text: str, path: str) -> str | None:
            raise RuntimeError("boom")

        with open(self.plan, "w") as f:
            json.dump([{"replace": ["9080", "9090"]}], f)
        editor = [sys.executable, self.script, "--plan", self.plan]
        self.assertRaises(
            RuntimeError, edit_config, self.path, editor, validate, lambda e: True
        )
        self.assertOnlyConfigLeft()
        self.assertEqual(self.read().decode(), self.ORIGINAL)
