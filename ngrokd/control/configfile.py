# -*- test-case-name: ngrokd.test.test_configfile -*-
"""
Changing C{config.yml} without losing what its author wrote in it.

C{set-api-key} changes one value: the new value is spliced into the text
where the parser found the old one (or a line is added), so every comment,
blank line, indentation and quote elsewhere stays byte for byte, whatever
style the file is in (a YAML round trip re-indents and moves comments). The
result is parsed again and must hold exactly the old settings plus the key.

C{config edit} is visudo's: the user edits a private copy, and the file is
replaced, atomically and keeping its mode and owner, only by a copy that
validates; an invalid copy is offered for editing again, so no work is lost.
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from attrs import frozen

from ngrokd.atomic import write_atomic
from ngrokd.config import ConfigError, check_ca_bundles, parse_config
from ngrokd.config.loader import (
    MAX_CONFIG_BYTES,
    check_config_size,
    config_text,
    read_config_file,
)
from ngrokd.readfile import read_regular

#: ngrok's API keys are about 50 characters: a longer one is something else.
MAX_API_KEY = 512


def _ownership(status: os.stat_result) -> tuple[int, tuple[int, int]]:
    """
    The permission bits and C{(uid, gid)} a rewrite of the file keeps.
    """
    return stat.S_IMODE(status.st_mode), (status.st_uid, status.st_gid)


def _compose(text: str, path: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise ConfigError(f"{path}:{line}: not valid YAML: {e.problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _child(mapping: yaml.MappingNode, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key, value in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            return key, value
    return None


def _indent(root: yaml.Node) -> str:
    """
    The indentation step the file uses for nested settings (two spaces when
    nothing is nested yet).
    """
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(value, yaml.MappingNode) and value.value:
                step: int = value.value[0][0].start_mark.column - key.start_mark.column
                if step > 0 and not value.flow_style:
                    return " " * step
    return "  "


def _line_end(text: str, index: int) -> int:
    """
    The index just past the line break ending the line that holds C{index}.
    """
    end = text.find("\n", index)
    return len(text) if end < 0 else end + 1


def _with_key(text: str, root: yaml.Node | None, entry: str, path: str) -> str:
    """
    C{text} with its C{api.key} replaced by, or given, the YAML scalar
    C{entry}, touching no other byte it can avoid.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    if root is None or (
        isinstance(root, yaml.ScalarNode) and root.tag.endswith("null")
    ):
        ending = "" if not text or text.endswith("\n") else newline
        return f"{text}{ending}api:{newline}  key: {entry}{newline}"
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{_line(root)}: the file must be a mapping")
    indent = _indent(root)
    found = _child(root, "api")
    if found is None:
        if root.flow_style:
            raise ConfigError(f"{path}: a flow-style file; set api.key by hand")
        column = " " * root.start_mark.column
        ending = "" if text.endswith("\n") else newline
        lines = f"{column}api:{newline}{column}{indent}key: {entry}{newline}"
        return f"{text}{ending}{lines}"
    name, api = found
    if isinstance(api, yaml.ScalarNode) and api.tag.endswith("null"):
        # "api:" or "api: ~": an empty section, given its first line.
        text = text[: name.end_mark.index] + ":" + text[api.end_mark.index :]
        at = _line_end(text, name.end_mark.index)
        column = " " * name.start_mark.column
        before = "" if text[:at].endswith("\n") else newline
        return f"{text[:at]}{before}{column}{indent}key: {entry}{newline}{text[at:]}"
    if not isinstance(api, yaml.MappingNode):
        raise ConfigError(f"{path}:{_line(api)}: api: must be a mapping")
    old = _child(api, "key")
    if old is not None:
        _, value = old
        if not isinstance(value, yaml.ScalarNode):
            raise ConfigError(f"{path}:{_line(value)}: api.key: must be a string")
        start, end = value.start_mark.index, value.end_mark.index
        spaced = " " if start == end and text[start - 1 : start] == ":" else ""
        region = text[start:end]
        kept = region[len(region.rstrip()) :]  # a block scalar's line breaks
        return f"{text[:start]}{spaced}{entry}{kept}{text[end:]}"
    if api.flow_style:
        brace = api.start_mark.index
        comma = ", " if api.value else ""
        return f"{text[: brace + 1]}key: {entry}{comma}{text[brace + 1 :]}"
    at = _line_end(text, name.end_mark.index)
    column = " " * api.value[0][0].start_mark.column
    return f"{text[:at]}{column}key: {entry}{newline}{text[at:]}"


def _settings(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    return loaded if isinstance(loaded, dict) else {}


def api_key_problem(key: str) -> str | None:
    """
    Why C{key} cannot be an ngrok API key (empty, too long, or holding a
    character that is not printable, such as a byte that was not UTF-8),
    never showing it; C{None} when it may be one.
    """
    if not key:
        return "it is empty"
    if len(key) > MAX_API_KEY:
        return f"it is longer than {MAX_API_KEY} characters"
    if not key.isprintable():
        return "it holds unprintable characters or bytes that are not UTF-8"
    return None


def store_api_key(path: str, key: str) -> int | None:
    """
    Set C{api.key} in the config file at C{path} to C{key}, quoted so that
    it stays a string, leaving every other byte of the file as it was, and
    replace the file atomically (the target of a symbolic link, so that
    the link stays) with the same owner and mode, less what group and
    others had: the file now holds a secret.

    Blocking: call it in a thread. No message ever holds the key.

    @return: the former mode when group or others could read or write the
        file, else C{None}.
    @raise ConfigError: the key is not one (L{api_key_problem}), or the
        file cannot be read, is not valid YAML, or its C{api} is not a
        mapping; naming the file, never the key.
    @raise ngrokd.atomic.AtomicWriteError: the file cannot be replaced.
    """
    problem = api_key_problem(key)
    if problem is not None:
        raise ConfigError(f"{path}: refusing the API key: {problem}")
    data, status = read_config_file(path)
    text = config_text(data, path)
    root = _compose(text, path)
    updated = _with_key(text, root, json.dumps(key, ensure_ascii=False), path)
    try:
        expected = _settings(text)
        api = expected.get("api")
        expected["api"] = {**(api if isinstance(api, dict) else {}), "key": key}
        same = _settings(updated) == expected
    except yaml.YAMLError:
        same = False
    if not same:
        raise ConfigError(
            f"{path}: cannot set api.key without changing other settings;"
            " set it by hand"
        )
    mode, owner = _ownership(status)
    private = mode & ~0o077
    write_atomic(os.path.realpath(path), updated.encode("utf-8"), private, owner)
    return mode if private != mode else None


def editor_command(environ: Mapping[str, str]) -> list[str]:
    """
    The user's editor as an argument list: C{$VISUAL}, then C{$EDITOR},
    then C{vi}; a command with arguments (C{code --wait}) is split as the
    shell would.

    @raise ValueError: the variable is not a command line (an open quote).
    """
    for name in ("VISUAL", "EDITOR"):
        try:
            command = shlex.split(environ.get(name, ""))
        except ValueError as e:
            raise ValueError(f"${name} is not a command line: {e}") from None
        if command:
            return command
    return ["vi"]


def validate_config(text: str, path: str) -> str | None:
    """
    C{None} when C{text} is a configuration the daemon would accept from
    C{path}, else the error, naming the file, line and key.
    """
    try:
        check_ca_bundles(parse_config(text, path, os.environ, sys.platform))
    except ConfigError as e:
        return str(e)
    return None


class Outcome(enum.Enum):
    SAVED = "saved"
    UNCHANGED = "unchanged"
    ABANDONED = "abandoned"
    EDITOR_FAILED = "editor failed"


@frozen
class EditResult:
    """
    How a L{edit_config} ended; C{message} is the line to show the user.
    """

    outcome: Outcome
    path: str
    #: The editor's exit status when it failed.
    editor_status: int | None = None
    #: Why the edit was not saved: the last validation error, or why the
    #: editor could not be run.
    error: str | None = None

    @property
    def message(self) -> str:
        if self.outcome is Outcome.SAVED:
            return f"{self.path}: saved"
        if self.outcome is Outcome.UNCHANGED:
            return f"{self.path}: no changes"
        if self.outcome is Outcome.ABANDONED:
            return f"{self.path}: left as it was; the edit had an error: {self.error}"
        why = self.error or f"the editor exited with status {self.editor_status}"
        return f"{self.path}: left as it was: {why}"


def _run_editor(argv: Sequence[str]) -> int:
    return subprocess.call(list(argv))


def edit_config(
    path: str,
    editor: Sequence[str],
    validate: Callable[[str, str], str | None],
    ask_again: Callable[[str], bool],
    run: Callable[[Sequence[str]], int] = _run_editor,
) -> EditResult:
    """
    Let the user edit the config file at C{path} with C{editor}, and replace
    it only with a copy that C{validate} accepts. A symbolic link stays:
    the file it points to is the one replaced (configuration management
    may own it).

    The copy is private (0600) and beside the file; it is removed
    whatever happens. While the copy is invalid (or not UTF-8),
    C{ask_again(error)} chooses between editing it again and leaving the
    file as it was. An editor that leaves no regular file where the copy
    was (it removed it, or left a FIFO) ends the edit.

    @raise ConfigError: the file cannot be read, or no copy can be made.
    @raise ngrokd.atomic.AtomicWriteError: the valid copy cannot replace it.
    """
    original, status = read_config_file(path)
    mode, owner = _ownership(status)
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    # Not ".tmp": write_atomic removes those as leftovers of its own writes.
    try:
        fd, copy = tempfile.mkstemp(
            prefix=f".{name}.edit-", suffix=".yml", dir=directory
        )
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot make a copy to edit in {directory}: {e.strerror or e}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(original)
        while True:
            try:
                status_code = run([*editor, copy])
            except OSError as e:
                why = f"cannot run {editor[0]}: {e.strerror or e}"
                return EditResult(Outcome.EDITOR_FAILED, path, error=why)
            if status_code != 0:
                return EditResult(
                    Outcome.EDITOR_FAILED, path, editor_status=status_code
                )
            try:
                edited, _ = read_regular(copy, MAX_CONFIG_BYTES + 1)
            except OSError as e:
                why = f"the editor left no file to read at {copy}: {e.strerror or e}"
                return EditResult(Outcome.EDITOR_FAILED, path, error=why)
            if edited == original:
                return EditResult(Outcome.UNCHANGED, path)
            try:
                check_config_size(edited, path)
                error = validate(config_text(edited, path), path)
            except ConfigError as e:
                error = str(e)
            if error is None:
                write_atomic(target, edited, mode, owner=owner)
                return EditResult(Outcome.SAVED, path)
            if not ask_again(error):
                return EditResult(Outcome.ABANDONED, path, error=error)
    finally:
        _remove_copy(copy)


def _remove_copy(copy: str) -> None:
    """
    Remove the edited copy, or whatever the editor left in its place.
    """
    try:
        os.unlink(copy)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(copy)
