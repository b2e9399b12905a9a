# -*- test-case-name: ngrokd.test.test_cli -*-
"""
The C{ngrokd} console script (also C{python -m ngrokd}): the daemon in the
foreground, or the service commands.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from ngrokd.cli.daemon_parser import RUN, parse, parser


def run(
    argv: Sequence[str],
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
    euid: int,
    interpreter: str = sys.executable,
    prefix: str = sys.prefix,
    platform: str = sys.platform,
) -> int:
    """
    Run one C{ngrokd} command line; the exit status. C{euid} runs it; the
    service runs C{interpreter}, of the installation in C{prefix}, on
    C{platform} (a C{sys.platform} value).
    """
    try:
        args = parse(argv, environ)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if args.command == RUN:
        from ngrokd.cli.foreground import run_daemon

        return run_daemon(args.config, args.instance)
    if args.command == "completion":
        from ngrokd.cli.completion import completion_script

        out.write(completion_script(parser(environ), args.shell))
        return 0
    from ngrokd.cli import service

    host = service.Host(
        root=args.root,
        environ=environ,
        euid=euid,
        platform=platform,
        interpreter=interpreter,
        prefix=prefix,
        out=out,
        err=err,
    )
    if args.command == "install":
        return service.install(args, host)
    if args.command == "uninstall":
        return service.uninstall(args, host)
    if args.command == "status":
        return service.status(args, host)
    return service.control(args, host)


def main() -> None:
    """
    The C{ngrokd} console script.
    """
    code = run(sys.argv[1:], dict(os.environ), sys.stdout, sys.stderr, os.geteuid())
    raise SystemExit(code)
