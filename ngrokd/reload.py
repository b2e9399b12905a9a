# -*- test-case-name: ngrokd.test.test_reload -*-
"""
A reload: the config file read again, and what changed applied in place.

The file is read off the reactor thread, in a thread of its own with a
bound (a hung filesystem must not hold the reactor, nor the stop). An
invalid file changes nothing; of a valid one, the keys that may change
while running (L{ngrokd.reconfigure}) are applied to the parts they
concern, each told only of what concerns it, and the others are reported
as waiting for a restart. Reloads run one at a time.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ngrokd.config import Config, ConfigError, load_config
from ngrokd.datapath.pool import PoolSettings
from ngrokd.ngrok.trust import load_api_trust, load_ingress_trust
from ngrokd.reactor import IDaemonReactor
from ngrokd.readfile import in_own_thread
from ngrokd.reconfigure import applied, changes

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon

#: Seconds a reload waits for the config file to be read.
READ_TIMEOUT = 30.0

#: The keys that change where endpoints listen, which names may be claimed,
#: or how names reach the system.
_PLAN_KEYS = frozenset(
    {
        "net.listen_interface",
        "net.overrides",
        "net.start_port",
        "net.allowed_domains",
        "api.url",
        "dns.mode",
        "dns.listen",
        "dns.upstreams",
    }
)

#: The keys the API client is made with: a reload that changes one makes a
#: new client.
_API_CLIENT_KEYS = frozenset(
    {
        "api.url",
        "api.ca_bundle",
        "api.timeout",
        "bound_endpoints.max_endpoints",
        "bound_endpoints.poll_timeout",
    }
)

#: The keys the identity service is told of: a reload that changes one
#: makes it act on them (ask ngrok, renew earlier).
_IDENTITY_KEYS = frozenset(
    {
        "bound_endpoints.selectors",
        "server.renew_before_days",
        "api.reregister_if_deleted",
    }
)


@frozen
class ReloadResult:
    """
    What a reload did: the keys it applied, those that wait for a restart,
    or why it changed nothing.
    """

    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    error: str = ""


def pool_settings(config: Config) -> PoolSettings:
    """
    The ingress connection pool as C{config} sets it.
    """
    ingress = config.ingress
    return PoolSettings(
        ingress.pool_size,
        ingress.pool_idle_timeout,
        ingress.pool_max_age,
        ingress.pool_linger,
    )


class Reloader:
    """
    The reloads of one L{Daemon}'s config file.
    """

    log = Logger()

    def __init__(
        self, daemon: Daemon, reactor: IDaemonReactor, clock: IReactorTime
    ) -> None:
        """
        @param clock: times the read of the file out.
        """
        self._daemon = daemon
        self._reactor = reactor
        self._clock = clock
        self._reloading = DeferredLock()

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read the config file again and apply what changed: hot keys at once
        (listeners rebound only where their address or port changed),
        restart-only keys reported and left as they are. An invalid file
        changes nothing. Reloads run one at a time.
        """
        return self._reloading.run(lambda: Deferred.fromCoroutine(self._reload()))

    async def _reload(self) -> ReloadResult:
        daemon = self._daemon
        path = daemon.config.path
        try:
            # Not in the reactor's pool: a stop would wait for a read that
            # never ends (a hung filesystem), and the process with it.
            loaded = await in_own_thread(
                self._reactor,
                self._clock,
                READ_TIMEOUT,
                partial(load_config, path, instance=daemon.instance_option),
                lambda: ConfigError(f"{path}: not read within {READ_TIMEOUT:g}s"),
            )
        except ConfigError as e:
            daemon.config_error = str(e)
            self.log.error(
                "reload refused, still running with the previous configuration:"
                " {error}",
                error=e,
            )
            return ReloadResult(error=str(e))
        for warning in loaded.warnings:
            self.log.warn("configuration: {problem}", problem=warning)
        found = changes(daemon.config, loaded.config)
        daemon.config_error = ""
        daemon.restart_pending = tuple(sorted(found.restart))
        for line in found.described():
            self.log.info("reload: {change}", change=line)
        if not found:
            self.log.info("reload: {path} has no changes", path=path)
        if found.hot:
            await self._use(applied(daemon.config, loaded.config), found.hot)
        return ReloadResult(
            applied=tuple(sorted(found.hot)), restart=daemon.restart_pending
        )

    async def _use(self, config: Config, changed: Mapping[str, object]) -> None:
        """
        Run with C{config}, whose C{changed} keys differ from the running one.
        """
        daemon = self._daemon
        daemon.config = config
        pool = self._reactor.getThreadPool()
        if changed.keys() & _API_CLIENT_KEYS:
            await daemon.registration.renew_client(
                await deferToThreadPool(
                    self._reactor, pool, load_api_trust, config.api.ca_bundle
                )
            )
        connector = daemon.connector
        if "ingress.ca_bundle" in changed:
            connector.use_trust(
                await deferToThreadPool(
                    self._reactor, pool, load_ingress_trust, config.ingress.ca_bundle
                )
            )
        ingress = config.ingress
        if changed.keys() & {"ingress.connect_timeout", "ingress.upgrade_timeout"}:
            connector.set_timeouts(ingress.connect_timeout, ingress.upgrade_timeout)
        if any(key.startswith("ingress.pool_") for key in changed):
            connector.pool.configure(pool_settings(config))
        if "ingress.early_data" in changed:
            connector.early_data = ingress.early_data
        if changed.keys() & _IDENTITY_KEYS:
            # It asks ngrok again: only when what it sends or decides changed.
            daemon.identity_service.reconfigure(
                config.bound_endpoints.selectors,
                datetime.timedelta(days=config.server.renew_before_days),
                config.api.reregister_if_deleted,
            )
        if "api.key" in changed:
            daemon.api_key = config.api.key
            daemon.identity_service.key_changed()
        if "bound_endpoints.poll_interval" in changed:
            daemon.discovery.set_interval(config.bound_endpoints.poll_interval)
        daemon.names.reconfigure(config)
        for observer in daemon.reconfigured:
            observer(config)
        if changed.keys() & _PLAN_KEYS:
            await daemon.applier.again()
