# -*- test-case-name: ngrokd.test.test_tap -*-
"""
C{twistd ngrokd}: command-line options and the service tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from ngrokd import __version__
from ngrokd.config import Config, ConfigError, LoadedConfig, load_config

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon

DEFAULT_CONFIG = "/etc/ngrokd/config.yml"

_log = Logger()


class Options(usage.Options):
    """
    C{twistd -n ngrokd --config FILE}.
    """

    synopsis = "[--config FILE]"
    longdesc = (
        "Make ngrok's Kubernetes-bound endpoints reachable from this machine: "
        "one local listener per endpoint, each connection carried to ngrok's "
        "binding ingress over mutual TLS."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The configuration file (YAML)."],
    ]

    loaded: LoadedConfig

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"ngrokd version {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        path = os.path.abspath(self["config"])
        if not os.path.exists(path) and self["config"] == DEFAULT_CONFIG:
            raise usage.UsageError(
                f"{path} does not exist: create it (see contrib/config.yml) or"
                " name another with --config"
            )
        try:
            self.loaded = load_config(path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The daemon's service tree; nothing starts until twistd starts it.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    for warning in options.loaded.warnings:
        _log.warn("{problem}", problem=warning)
    return build_daemon(options.loaded.config, reactor, os.environ)


def build_daemon(
    config: Config, reactor: Any, environ: Mapping[str, str] | None = None
) -> Daemon:
    """
    The daemon with its control surfaces: the log level, the health and
    metrics server, the event feed, the control socket and, when
    C{environ} names a C{NOTIFY_SOCKET}, the systemd notifier.
    """
    from ngrokd.control.feed import EventFeed
    from ngrokd.control.notify import SystemdNotifier
    from ngrokd.control.server import ControlService
    from ngrokd.control.watcher import ConfigWatcher
    from ngrokd.daemon import Daemon
    from ngrokd.logs import LogLevelService, level_named

    daemon = Daemon(config, reactor)
    log_level = LogLevelService(level_named(config.server.log_level))
    log_level.setServiceParent(daemon)
    daemon.reconfigured.append(
        lambda new: log_level.set_level(level_named(new.server.log_level))
    )
    feed = EventFeed(daemon.daemon_status, daemon.endpoint_status, reactor)
    if config.server.health_address:
        from ngrokd.control.health import HealthService
        from ngrokd.control.metrics import DaemonMetrics
        from ngrokd.control.web import WebPage

        metrics = DaemonMetrics(daemon)
        web = WebPage(
            daemon.daemon_status,
            daemon.endpoint_status,
            feed,
            metrics.upgrade_percentiles,
            config.server.web_hosts,
            reactor,
        )
        health = HealthService(
            config.server.health_address, daemon, metrics.registry, reactor, web
        )
        health.setServiceParent(daemon)
    feed.setServiceParent(daemon)
    ControlService(daemon, feed, reactor).setServiceParent(daemon)
    ConfigWatcher(config.path, daemon.reload, reactor).setServiceParent(daemon)
    notifier = SystemdNotifier(
        daemon.daemon_status, reactor, environ or {}, os.getpid()
    )
    if notifier.enabled:
        notifier.setServiceParent(daemon)
        daemon.stopping.append(notifier.stopping)
    return daemon
