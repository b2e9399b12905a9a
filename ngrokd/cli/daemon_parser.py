# -*- test-case-name: ngrokd.test.test_cli -*-
"""
C{ngrokd}'s command line: run the daemon, or install and drive it as a
service, as the Go ngrokd's C{ngrokd install|start|stop|restart|status}.

Plain argparse, importable without Twisted (see L{ngrokd.cli}).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from ngrokd.cli.ctl_parser import SHELLS
from ngrokd.cli.options import anywhere, misplaced
from ngrokd.cli.version import VersionAction
from ngrokd.instance import config_path

#: What runs the daemon; C{ngrokd} alone, or with only options, is C{run}.
RUN = "run"
#: The commands that drive the service manager.
SERVICE_COMMANDS = ("install", "uninstall", "start", "stop", "restart", "status")
#: The service managers C{install} writes for.
MANAGERS = ("systemd", "launchd")
#: The environment variable that sets C{--root}'s default.
ROOT_VARIABLE = "NGROKD_ROOT"

GLOBAL_OPTIONS = (
    anywhere(
        "-c",
        "--config",
        metavar="FILE",
        applies={RUN},
        help=f"the configuration file (default: {config_path('')}, or"
        " /etc/ngrokd/NAME/config.yml for --instance NAME)",
    ),
    anywhere(
        "-i",
        "--instance",
        metavar="NAME",
        applies={RUN, *SERVICE_COMMANDS},
        help="the named instance (a-z, 0-9, '-'), beside others: its own"
        " config, state directory, socket, interface and service",
    ),
)

#: Go's flag package takes C{-config} as C{--config}: units written for
#: the Go ngrokd say either.
_GO_FLAGS = ("-config", "-instance", "-version")


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """
    The whole C{ngrokd} command line; C{environ} gives C{--root}'s default.
    """
    root = (environ or {}).get(ROOT_VARIABLE) or "/"
    top = argparse.ArgumentParser(
        prog="ngrokd",
        description="Reach ngrok's Kubernetes-bound endpoints by name from this"
        " machine. Without a command, or with run, the daemon runs in the"
        " foreground exactly as 'twistd --nodaemon --pidfile= ngrokd' runs it;"
        " the other commands install it as a system service and drive it.",
    )
    top.add_argument("--version", action=VersionAction)
    for option in GLOBAL_OPTIONS:
        option.add_to_top(top)
    commands = top.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        for option in GLOBAL_OPTIONS:
            option.add_to_command(sub, name)
        if name in SERVICE_COMMANDS:
            sub.add_argument(
                "--root",
                metavar="DIR",
                default=root,
                help="the file system to install into and look in, for images"
                f" and tests (default: ${ROOT_VARIABLE}, then /); the service"
                " manager is asked only when it runs there",
            )
            sub.add_argument(
                "--service-manager",
                choices=MANAGERS,
                help="the service manager (default: launchd on macOS, else systemd)",
            )
        return sub

    command(RUN, "run the daemon in the foreground (the default)")
    install = command(
        "install",
        "write the service (systemd unit or launchd job) that runs this"
        " installation, and a config file when there is none",
    )
    install.add_argument(
        "--force",
        action="store_true",
        help="replace a service file that differs from what this"
        " installation writes (the config file is never replaced)",
    )
    uninstall = command(
        "uninstall", "stop and remove the service; the config and state stay"
    )
    uninstall.add_argument(
        "--purge",
        action="store_true",
        help="remove the config file and the state directory too (the"
        " machine's identity with ngrok: its key, certificate and operator id)",
    )
    command("start", "start the service")
    command("stop", "stop the service")
    command("restart", "restart the service")
    command("status", "the service manager's view, then ngrokctl status")
    completion = command("completion", "print the shell completion script")
    completion.add_argument("shell", choices=SHELLS)
    return top


def go_style(argv: Sequence[str]) -> list[str]:
    """
    C{argv} with the Go ngrokd's single-dash long flags (C{-config=F})
    spelled as argparse reads them (C{--config=F}).
    """
    return ["-" + arg if arg.split("=", 1)[0] in _GO_FLAGS else arg for arg in argv]


def parse(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """
    C{argv} parsed; no command is L{RUN}.

    @raise SystemExit: after argparse's message on stderr.
    """
    top = parser(environ)
    args = top.parse_args(go_style(argv))
    if args.command is None:
        args.command = RUN
    wrong = misplaced(GLOBAL_OPTIONS, args.command, args)
    if wrong is not None:
        top.error(wrong)
    return args
