# -*- test-case-name: ngrokd.test.test_ctl -*-
"""
C{ngrokctl}: ask and tell a running ngrokd, over its control socket.

Commands: C{status}, C{list}, C{health}, C{events}, C{reload},
C{set-api-key}, C{config edit}, C{diagnose}, C{completion}; the command
line is L{ngrokd.cli.ctl_parser}'s. Read commands print tables, or JSON
with C{-o json}.
Errors go to stderr, each with an exit code of its own
(L{ngrokd.control.client}): 3 when ngrokd is not running, 4 when the
socket or the command is not allowed to this user, 5 on a timeout, 6 when
the two sides' versions differ, 7 when a reload left keys for a restart;
C{health} exits 1 when not ready.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from argparse import Namespace
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

import attrs
from attrs import define
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react

from ngrokd.cli.ctl_parser import parse
from ngrokd.config import ConfigError
from ngrokd.control.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RESTART,
    EXIT_USAGE,
    Control,
    ControlError,
    connect,
)
from ngrokd.control.configfile import (
    MAX_API_KEY,
    Outcome,
    api_key_problem,
    edit_config,
    editor_command,
    validate_config,
)
from ngrokd.control.render import (
    check_lines,
    endpoint_names,
    endpoint_table,
    event_line,
    status_lines,
)
from ngrokd.control.verdict import first_broken
from ngrokd.instance import (
    DEFAULT_SOCKET,
    InstanceNameError,
    check_name,
    config_path,
    socket_path,
)

#: How a config edit ends well.
_EDIT_DONE = (Outcome.SAVED, Outcome.UNCHANGED)
#: How long one events call waits for something to happen, in seconds.
EVENTS_WAIT = 25.0


@define
class Console:
    """
    Where ngrokctl reads and writes: the process's streams, or a test's.
    """

    out: TextIO
    err: TextIO
    stdin: TextIO
    environ: dict[str, str]

    @property
    def colour(self) -> bool:
        return self.out.isatty() and "NO_COLOR" not in self.environ

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def warn(self, line: str) -> None:
        self.err.write(f"ngrokctl: {line}\n")
        self.err.flush()


async def run(reactor: IReactorCore, argv: Sequence[str], console: Console) -> int:
    """
    Run one ngrokctl command line; the exit code.
    """
    try:
        args = parse(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    if args.command == "completion":
        from ngrokd.cli.completion import completion_script
        from ngrokd.cli.ctl_parser import parser

        console.out.write(completion_script(parser(), args.shell))
        return EXIT_OK
    if args.instance is not None:
        try:
            check_name(args.instance)
        except InstanceNameError as e:
            console.warn(f"--instance: {e}")
            return EXIT_USAGE
        socket = args.socket or socket_path(args.instance)
    else:
        socket = args.socket or console.environ.get("NGROKD_SOCKET") or DEFAULT_SOCKET
    try:
        if args.command == "config":
            return await _config_edit(
                reactor, socket, args.config, args.instance or "", console
            )
        if args.command == "diagnose":
            return await _diagnose(reactor, socket, args, console)
        if args.command == "set-api-key":
            args.key = _api_key(args, console)
        control = await connect(reactor, socket)
        try:
            return await _COMMANDS[args.command](control, args, console)
        finally:
            control.close()
    except ControlError as e:
        console.warn(str(e))
        return e.code
    except _BadInput as e:
        console.warn(str(e))
        return EXIT_USAGE


async def _status(control: Control, args: Namespace, console: Console) -> int:
    status = await control.status()
    if args.output == "json":
        console.say(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    counts = Counter([row["state"] async for row in control.endpoints()])
    for line in status_lines(status, counts, console.colour):
        console.say(line)
    return EXIT_OK


async def _list(control: Control, args: Namespace, console: Console) -> int:
    rows = [row async for row in control.endpoints(args.text, args.state)]
    if args.names:
        for name in endpoint_names(rows):
            console.say(name)
        return EXIT_OK
    if args.output == "json":
        console.say(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    filtered = bool(args.text or args.state)
    for line in endpoint_table(rows, console.colour, filtered):
        console.say(line)
    return EXIT_OK


async def _health(control: Control, args: Namespace, console: Console) -> int:
    status = await control.status()
    ready, because = status["ready"], status["not_ready_because"]
    if args.output == "json":
        console.say(json.dumps({"ready": ready, "not_ready_because": because}))
    else:
        console.say("ready" if ready else f"not ready: {because}")
    return EXIT_OK if ready else EXIT_FAILED


async def _events(control: Control, args: Namespace, console: Console) -> int:
    _, last = await control.events(2**53, 0.0)
    seen = max(0, last - max(0, args.tail))
    while True:
        found, last = await control.events(seen, 0.0 if args.once else EVENTS_WAIT)
        for event in found:
            if args.output == "json":
                console.say(json.dumps(event, sort_keys=True))
            else:
                console.say(event_line(event, console.colour))
        if found:
            seen = found[-1]["id"]
        elif last < seen:
            seen = last  # the daemon restarted: its numbering did too
        if args.once and not found:
            return EXIT_OK


class _BadInput(Exception):
    """
    What the user gave cannot be used: C{str(error)} says why.
    """


def _api_key(args: Namespace, console: Console) -> str:
    """
    The key to set: from the command line (with a warning), a prompt on a
    terminal, or one line of stdin, read no further than the longest key.

    @raise _BadInput: none, or not a key (L{api_key_problem}).
    """
    key: str | None = args.key
    if key is not None:
        console.warn(
            "a key given on the command line shows in ps and in shell history;"
            " pipe it in instead: ngrokctl set-api-key < keyfile"
        )
    try:
        if key is None and console.stdin.isatty():
            key = getpass.getpass("ngrok API key: ", stream=console.err)
        elif key is None:
            # One character over the longest key, and its line break: enough
            # to tell a key too long, however much more follows.
            key = console.stdin.readline(MAX_API_KEY + 2)
    except UnicodeDecodeError:
        raise _BadInput("refusing the API key: it is not UTF-8 text") from None
    key = key.strip()
    if not key:
        raise _BadInput("no API key given")
    problem = api_key_problem(key)
    if problem is not None:
        raise _BadInput(f"refusing the API key: {problem}")
    return key


async def _set_api_key(control: Control, args: Namespace, console: Console) -> int:
    console.say(await control.set_api_key(args.key))
    return EXIT_OK


async def _reload(control: Control, args: Namespace, console: Console) -> int:
    result = await control.reload()
    if result["error"]:
        console.warn(f"not reloaded, nothing changed: {result['error']}")
        return EXIT_FAILED
    if result["applied"]:
        console.say("applied: " + ", ".join(result["applied"]))
    if result["restart"]:
        console.warn(
            "changed, but applied only at a restart: " + ", ".join(result["restart"])
        )
        return EXIT_RESTART
    if not result["applied"]:
        console.say("no changes")
    return EXIT_OK


_COMMANDS = {
    "status": _status,
    "list": _list,
    "health": _health,
    "events": _events,
    "set-api-key": _set_api_key,
    "reload": _reload,
}


async def _config_edit(
    reactor: IReactorCore,
    socket: str,
    path: str | None,
    instance: str,
    console: Console,
) -> int:
    if path is None:
        path = await _daemon_config(reactor, socket) or config_path(instance)
    if not os.path.exists(path):
        console.warn(f"{path} does not exist: name the file with --config")
        return EXIT_FAILED

    def ask_again(error: str) -> bool:
        console.warn(error)
        if not console.stdin.isatty():
            return False
        console.err.write("Edit again? [Y/n] ")
        console.err.flush()
        return console.stdin.readline().strip().lower() not in ("n", "no")

    try:
        result = edit_config(
            path, editor_command(console.environ), validate_config, ask_again
        )
    except (ConfigError, OSError) as e:
        console.warn(str(e))
        return EXIT_FAILED
    console.say(result.message)
    return EXIT_OK if result.outcome in _EDIT_DONE else EXIT_FAILED


async def _diagnose(
    reactor: IReactorCore, socket: str, args: Namespace, console: Console
) -> int:
    from ngrokd.control.diagnose import Diagnosis

    path = (
        args.config
        or await _daemon_config(reactor, socket)
        or config_path(args.instance or "")
    )
    checks = await Diagnosis(reactor, path, socket, instance=args.instance).run()
    broken = first_broken(checks)
    if args.output == "json":
        document = {
            "checks": [attrs.asdict(check) for check in checks],
            "first_broken": broken.name if broken else None,
        }
        console.say(json.dumps(document, indent=2))
    else:
        for line in check_lines(checks):
            console.say(line)
    return EXIT_FAILED if broken else EXIT_OK


async def _daemon_config(reactor: IReactorCore, socket: str) -> str | None:
    """
    The config file of the daemon on C{socket}, if one answers.
    """
    try:
        control = await connect(reactor, socket)
    except ControlError:
        return None
    try:
        status = await control.status()
    except ControlError:
        return None
    finally:
        control.close()
    path: str = status["config_path"]
    return path


def main() -> None:
    """
    The C{ngrokctl} console script.
    """
    console = Console(sys.stdout, sys.stderr, sys.stdin, dict(os.environ))

    async def command(reactor: IReactorCore) -> None:
        raise SystemExit(await run(reactor, sys.argv[1:], console))

    react(command)


if __name__ == "__main__":
    main()
