# -*- test-case-name: ngrokd.test.test_cli -*-
"""
C{ngrokd run}: the daemon in the foreground, run by twistd's own runner.

The options are twistd's (C{--nodaemon --pidfile= ngrokd --config FILE}),
parsed by twistd's L{ServerOptions} and run by its C{runApp}, so the
reactor, the logging, the signal handling and the exit status (the signal
the daemon stopped for, as systemd expects) are those of C{twistd -n
ngrokd}. Only two things differ: the service maker is given rather than
found by scanning Twisted's plugins (no plugin cache is read, or written
into a read-only installation), and a bad option or config is one line on
stderr instead of twistd's whole usage.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from twisted.application.service import ServiceMaker
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions, runApp  # type: ignore[attr-defined]

#: The daemon's service maker, as the plugin in C{twisted/plugins} names it.
_MAKER = ServiceMaker(
    "ngrokd",
    "ngrokd.tap",
    "Reach ngrok's Kubernetes-bound endpoints by name from this machine.",
    "ngrokd",
)


def twistd_arguments(config: str | None, instance: str | None) -> list[str]:
    """
    The twistd command line (after C{twistd}) that runs the daemon in the
    foreground, as the systemd unit in C{contrib/} does.
    """
    arguments = ["--nodaemon", "--pidfile=", "ngrokd"]
    if config is not None:
        arguments += ["--config", config]
    if instance is not None:
        arguments += ["--instance", instance]
    return arguments


class _Options(ServerOptions):
    """
    twistd's options with one subcommand, C{ngrokd}, given rather than
    looked up among the installed plugins.
    """

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Any, str]]:
        self.loadedPlugins = {_MAKER.tapname: _MAKER}
        yield (_MAKER.tapname, None, lambda: _MAKER.options(), _MAKER.description)


def run_daemon(config: str | None, instance: str | None) -> int:
    """
    Run the daemon until it stops; the exit status when it ends by itself
    (a daemon stopped by a signal ends by that signal, as twistd's does).
    """
    options: ServerOptions = _Options()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(twistd_arguments(config, instance))
    except usage.UsageError as e:
        sys.stderr.write(f"ngrokd: {e}\n")
        return 1
    runApp(options)
    return 0
