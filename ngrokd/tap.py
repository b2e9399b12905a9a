# -*- test-case-name: ngrokd.test.test_tap -*-
"""
C{twistd ngrokd}: command-line options and the service tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from ngrokd import __version__
from ngrokd.config import Config, ConfigError, LoadedConfig, load_config
from ngrokd.instance import config_path
from ngrokd.logoutput import choose
from ngrokd.servicetree import attach

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ngrokd.daemon import Daemon

DEFAULT_CONFIG = config_path("")

_log = Logger()


class Options(usage.Options):
    """
    C{twistd -n ngrokd [--instance NAME] [--config FILE]}.
    """

    synopsis = "[--instance NAME] [--config FILE]"
    longdesc = (
        "Make ngrok's Kubernetes-bound endpoints reachable from this machine: "
        "one local listener per endpoint, each connection carried to ngrok's "
        "binding ingress over mutual TLS."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            f"The configuration file (YAML) [default: {DEFAULT_CONFIG}, or"
            " /etc/ngrokd/NAME/config.yml for --instance NAME]",
        ],
        [
            "instance",
            "i",
            None,
            "Run as the named instance (a-z, 0-9, '-'): its own state"
            " directory, socket, interface and hosts section, beside others;"
            " replaces server.instance.",
        ],
    ]

    loaded: LoadedConfig

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"ngrokd version {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["config"] is None:
            default = config_path(self["instance"] or "")
            if not os.path.exists(default):
                raise usage.UsageError(
                    f"{default} does not exist: create it (see"
                    " contrib/config.yml) or name another with --config"
                )
            self["config"] = default
        path = os.path.abspath(self["config"])
        try:
            self.loaded = load_config(path, instance=self["instance"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        twistd = getattr(self, "parent", None)
        if twistd is not None:
            # twistd reads its --logger once this subcommand is parsed.
            choose(twistd, self.loaded.config.server.log_format)


def makeService(options: Options, reactor: IReactorCore | None = None) -> IService:
    """
    The daemon's service tree; nothing starts until twistd starts it. Run
    by twistd (on its reactor), it also takes over SIGTERM and SIGINT, gives
    the C heap's freed memory back after a storm of connections, and keeps
    what each changed reconcile made out of the garbage collector's way.
    """
    from ngrokd.host.memory import MemoryTrimmer
    from ngrokd.signals import SignalReactor, StopOnSignal

    for warning in options.loaded.warnings:
        _log.warn("configuration: {problem}", problem=warning)
    if reactor is not None:
        return build_daemon(
            options.loaded.config, reactor, os.environ, options["instance"]
        )
    from twisted.internet import reactor as twistd_reactor

    daemon = build_daemon(
        options.loaded.config, twistd_reactor, os.environ, options["instance"]
    )
    daemon.exit_when_locked = True
    daemon.freeze_after_changes = True
    # Twisted types its reactor without callFromThread and the private
    # _exitSignal, both of which twistd's reactors have (test_twisted_seams).
    signal_reactor = cast(SignalReactor, twistd_reactor)
    attach(StopOnSignal(daemon, signal_reactor), daemon)
    # The process's own heap: one per process, so only under twistd.
    attach(
        MemoryTrimmer(
            IReactorThreads(twistd_reactor), lambda: daemon.listeners.connections_open
        ),
        daemon,
    )
    return daemon


def build_daemon(
    config: Config,
    reactor: IReactorCore,
    environ: Mapping[str, str] | None = None,
    instance_option: str | None = None,
) -> Daemon:
    """
    The daemon with its control surfaces: the log level, the health and
    metrics server, the event feed, the control socket and, when
    C{environ} names a C{NOTIFY_SOCKET}, the systemd notifier.
    C{instance_option}, the C{--instance} given, stays in force at reloads.

    @param reactor: runs the daemon; it must also provide L{IReactorTime}
        and, with a health server, L{IReactorThreads}, as twistd's reactors
        do.
    """
    from ngrokd.control.feed import EventFeed
    from ngrokd.control.notify import SystemdNotifier
    from ngrokd.control.server import ControlService
    from ngrokd.control.watcher import ConfigWatcher
    from ngrokd.daemon import Daemon
    from ngrokd.logs import LogLevelService, level_named

    daemon = Daemon(config, reactor)
    daemon.instance_option = instance_option
    log_level = LogLevelService(level_named(config.server.log_level))
    attach(log_level, daemon)
    daemon.reconfigured.append(
        lambda new: log_level.set_level(level_named(new.server.log_level))
    )
    clock = IReactorTime(reactor)
    feed = EventFeed(daemon.daemon_status, daemon.board, clock)
    if config.server.health_address:
        from twisted.internet.threads import deferToThreadPool

        from ngrokd.control.health import HealthService, Scraped
        from ngrokd.control.metrics import DaemonMetrics
        from ngrokd.control.web import WebPage

        metrics = DaemonMetrics(daemon)

        def refresh_in_thread() -> Deferred[None]:
            threads = IReactorThreads(reactor)
            return deferToThreadPool(
                threads, threads.getThreadPool(), metrics.process.refresh
            )

        web = WebPage(
            daemon.daemon_status,
            daemon.board,
            feed,
            metrics.upgrade_percentiles,
            config.server.web_hosts,
            clock,
        )
        health = HealthService(
            config.server.health_address,
            daemon,
            metrics.registry,
            reactor,
            web,
            Scraped(
                before=refresh_in_thread,
                per_endpoint=metrics.endpoint_series,
            ),
        )
        attach(health, daemon)
    attach(feed, daemon)
    attach(ControlService(daemon, feed, reactor), daemon)
    attach(ConfigWatcher(config.path, daemon.reload, clock), daemon)
    notifier = SystemdNotifier(daemon.daemon_status, clock, environ or {}, os.getpid())
    if notifier.enabled:
        attach(notifier, daemon)
        daemon.stopping.append(notifier.stopping)
    return daemon
