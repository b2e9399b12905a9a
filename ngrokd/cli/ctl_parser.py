# -*- test-case-name: ngrokd.test.test_cli -*-
"""
C{ngrokctl}'s command line: its parser and what a parsed line may hold.

Plain argparse on the standard library and L{ngrokd.instance}, so that the
man page and the shell completions are made from this very parser at
build time, without Twisted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ngrokd.cli.options import anywhere, misplaced
from ngrokd.cli.version import VersionAction
from ngrokd.instance import DEFAULT_SOCKET, config_path

#: The commands that print a table, or JSON with C{-o json}.
READ_COMMANDS = ("status", "list", "health", "events", "diagnose")
#: The shells C{ngrokctl completion} writes for.
SHELLS = ("bash", "zsh", "fish")
#: An endpoint's states (L{ngrokd.status}), for C{list --state}.
STATES = ("listening", "starting", "failed")
#: How a shell completes an endpoint's name: it asks the running daemon
#: (nothing when none answers). shtab's form, kept free of shtab here.
_NAMES = "ngrokctl list --names 2>/dev/null"
ENDPOINT_NAMES = {
    "bash": "_ngrokctl_endpoint_names",
    "zsh": f"($({_NAMES}))",
    "fish": f"({_NAMES})",
    "preamble": {
        "bash": "_ngrokctl_endpoint_names() {\n"
        f'  compgen -W "$({_NAMES})" -- "$1"\n'
        "}\n",
    },
}

_FILE_HELP = (
    f"the file (default: the running daemon's, then {config_path('')}"
    " or the instance's)"
)

#: The options that may come before or after the command's name.
GLOBAL_OPTIONS = (
    anywhere(
        "--socket",
        metavar="PATH",
        help="the daemon's control socket (default: the instance's, then"
        f" $NGROKD_SOCKET, then {DEFAULT_SOCKET})",
    ),
    anywhere(
        "--instance",
        metavar="NAME",
        help="the named ngrokd instance: its socket /var/run/ngrokd-NAME.sock"
        " and its config /etc/ngrokd/NAME/config.yml",
    ),
    anywhere(
        "--config", metavar="FILE", applies={"diagnose", "config"}, help=_FILE_HELP
    ),
    anywhere(
        "-o",
        "--output",
        applies=READ_COMMANDS,
        choices=["table", "json"],
        help="a table for people (the default), or JSON for scripts",
    ),
)


def parser() -> argparse.ArgumentParser:
    """
    The whole C{ngrokctl} command line.
    """
    top = argparse.ArgumentParser(
        prog="ngrokctl",
        description="Ask and tell a running ngrokd over its control socket."
        " --socket, --instance, --config and -o may come before or after the"
        " command.",
    )
    top.add_argument("--version", action=VersionAction)
    for option in GLOBAL_OPTIONS:
        option.add_to_top(top)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, **more: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=more.get("about", text))
        for option in GLOBAL_OPTIONS:
            option.add_to_command(sub, name)
        return sub

    command("status", "who the daemon is to ngrok, and how it does")
    listing = command(
        "list",
        "every bound endpoint: where to connect, its state",
        about="Every bound endpoint, or those TEXT and --state select (the web"
        " page's filters).",
    )
    listing.add_argument(
        "text",
        nargs="?",
        default="",
        metavar="TEXT",
        help="only the endpoints whose URL, id or client address holds TEXT (any case)",
    ).complete = ENDPOINT_NAMES  # type: ignore[attr-defined]
    listing.add_argument(
        "--state",
        default="",
        choices=STATES,
        help="only the endpoints in this state",
    )
    listing.add_argument(
        "--names",
        action="store_true",
        help="print each endpoint's hostname once, one a line (for scripts and"
        " shell completion)",
    )
    command("health", "whether the daemon is ready; exits 1 when not")
    events = command("events", "follow what happens, live")
    events.add_argument(
        "--tail", type=int, default=10, help="show this many past events first"
    )
    events.add_argument(
        "--once", action="store_true", help="print the past events and stop"
    )
    command(
        "reload",
        "read the config file again and apply what changed",
        about="Exit 1 when the file is invalid (nothing changes), 7 when"
        " some changed keys wait for a restart.",
    )
    key = command(
        "set-api-key",
        "try an ngrok API key, then use and save it",
        about="The key is read from stdin (or a prompt on a terminal)"
        " so that it stays out of ps and shell history.",
    )
    key.add_argument("key", nargs="?", help=argparse.SUPPRESS)
    command("diagnose", "check each hop of the path; exits 1 at the first broken one")
    config = command("config", "the configuration file")
    config.add_argument("action", choices=["edit"])
    completion = command(
        "completion",
        "print the shell completion script",
        about="Print ngrokctl's completion script for SHELL. Put it where"
        " the shell looks: bash: ~/.local/share/bash-completion/completions/"
        "ngrokctl; zsh: a file _ngrokctl in a directory of $fpath; fish:"
        " ~/.config/fish/completions/ngrokctl.fish.",
    )
    completion.add_argument("shell", choices=SHELLS)
    return top


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """
    C{argv} parsed, C{-o} defaulted to C{table}.

    @raise SystemExit: after argparse's message on stderr, when C{argv} is
        not a valid command line (an option given to a command it does
        not apply to included).
    """
    top = parser()
    args = top.parse_args(argv)
    wrong = misplaced(GLOBAL_OPTIONS, args.command, args)
    if wrong is not None:
        top.error(wrong)
    if args.output is None:
        args.output = "table"
    return args
