# -*- test-case-name: ngrokd.test.test_daemon_net,ngrokd.test.test_daemon_e2e -*-
"""
The daemon: who this machine is to ngrok, which endpoints it serves, where.

L{Daemon} owns the state and wires the pieces: the identity (certificate and
operator id, registered through the API when missing), the discovery poll, the
plan from endpoints to listeners, the virtual-mode addresses, the names
(the DNS server and its registration, L{ngrokd.host.nameservice}, and the
hosts file for what DNS does not serve), and the listeners that bridge each
accepted connection to the binding ingress. Data flows one way: poll ->
parse -> allocate -> plan -> addresses -> listeners -> names. A failed poll
or registration never stops what already works.

Stopping is bounded: the listeners close at once, the connections already
open get C{server.shutdown_grace} seconds to finish, the rest are reset (and
counted), and only then do the names and addresses go. L{Daemon.stop_now}
(a second SIGTERM or SIGINT, through L{StopOnSignal}) cuts the grace short.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
import stat
from collections.abc import Callable, Mapping
from functools import partial
from types import FrameType
from typing import Any

import attrs
from attrs import frozen
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ngrokd import __version__
from ngrokd.atomic import AtomicWriteError
from ngrokd.blocking import BlockingPool, one_thread
from ngrokd.board import StatusBoard
from ngrokd.config import SUBNET6_AUTO, SUBNET6_OFF, Config, ConfigError, load_config
from ngrokd.datapath.bridge import LocalProtocol
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.listeners import ListenerSet, raise_open_file_limit
from ngrokd.datapath.pool import PoolSettings
from ngrokd.endpoints import BoundEndpoint
from ngrokd.host import allocation, ula
from ngrokd.host.allocation import IPAddress, IPNetwork
from ngrokd.host.hosts import HostsService
from ngrokd.host.nameservice import NameService
from ngrokd.host.netif import INetworkInterface
from ngrokd.host.netif.service import InterfaceService
from ngrokd.host.statelock import StateDirectoryLocked, StateLock
from ngrokd.names import name_rules
from ngrokd.ngrok import lastgood
from ngrokd.ngrok.api import ApiEndpoint, APIError, NgrokAPI, NoAPIKey, make_api
from ngrokd.ngrok.discovery import EndpointDiscoveryService
from ngrokd.ngrok.identity import Identity, IdentityStore
from ngrokd.ngrok.identity_service import EXPIRED, IdentityService
from ngrokd.ngrok.trust import (
    LateTrustPolicy,
    PartialChainTrust,
    TrustRoot,
    load_api_trust,
    load_ingress_trust,
)
from ngrokd.pem import PEMError
from ngrokd.plan import Plan
from ngrokd.problems import Problems
from ngrokd.readfile import in_own_thread
from ngrokd.reconfigure import applied, changes
from ngrokd.replan import Replanner
from ngrokd.status import DaemonStatus, EndpointStatus

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


@frozen
class ReloadResult:
    """
    What a reload did: the keys it applied, those that wait for a restart,
    or why it changed nothing.
    """

    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    error: str = ""


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

#: Endpoints parsed, or status rows made, in one turn of the reactor
#: while a reconcile applies a large change.
ROWS_AT_ONCE = 500
#: With this many endpoints or more, a changed poll's allocations and plan
#: are decided in a thread (pure functions; the reactor carries on).
DECIDE_IN_THREAD = 1000

#: Seconds a stop may take as a whole (listeners, hosts file, addresses).
STOP_TIMEOUT = 60.0
#: Seconds a reload waits for the config file to be read.
READ_TIMEOUT = 30.0

#: What fails when a state file cannot be written, for status and the log.
_SAVING = "saving the addresses and ports"
_KEEPING = "keeping the last good list of endpoints"
_READING = "reading the CA and state files at start"


@frozen
class _Files:
    """
    What the daemon reads at start, in its file thread.
    """

    api_trust: TrustRoot
    ingress_trust: PartialChainTrust
    subnet6: IPNetwork | None
    #: The global ID C{subnet6} was derived from, when it is new (unsaved).
    new_global_id: int | None
    allocations: allocation.Allocations
    kept: tuple[str, list[ApiEndpoint]] | None


class Daemon(MultiService):
    """
    The whole daemon, as one service tree.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        network_interface: INetworkInterface | None = None,
        clock: IReactorTime | None = None,
        threadpool: Callable[[str], ThreadPool] = one_thread,
    ) -> None:
        """
        @param network_interface: carries the virtual-mode addresses (by
            default the platform's; tests give another).
        @param clock: times the grace given to open connections when
            stopping (by default the reactor).
        @param threadpool: makes the pool of the thread that reads and
            writes the daemon's files while it runs (by default one thread).
        """
        super().__init__()
        self.config = config
        #: The C{--instance} option, kept for every reload of the file.
        self.instance_option: str | None = None
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.api_key = config.api.key
        self._api_tls = LateTrustPolicy()
        self.api: NgrokAPI = self._api_client(lambda: self.api_key)
        ingress = config.ingress
        self.connector = IngressConnector(
            reactor,
            ingress.host,
            ingress.port,
            connect_timeout=ingress.connect_timeout,
            upgrade_timeout=ingress.upgrade_timeout,
            insecure_skip_verify=ingress.insecure_skip_verify,
            max_pending=ingress.max_pending_dials,
            queue_timeout=ingress.dial_queue_timeout,
            pool=_pool_settings(config),
            early_data=ingress.early_data,
        )
        server = config.server
        #: Reads and writes the CA and state files, off the reactor thread.
        self.file_thread = BlockingPool(reactor, "ngrokd-files", threadpool)
        self.state_lock = StateLock(server.state_dir)
        #: Run by twistd, a locked state directory ends the process with the
        #: message alone (exit status 1), not a traceback.
        self.exit_when_locked = False
        #: Run by twistd, the objects alive after a reconcile that changed
        #: something are frozen out of the garbage collector's way.
        self.freeze_after_changes = False
        self.identity_service = IdentityService(
            IdentityStore(server.state_dir, server.client_cert, server.client_key),
            self.api,
            reactor,
            in_thread=self.file_thread.run,
            selectors=config.bound_endpoints.selectors,
            hostname=socket.gethostname(),
            has_key=lambda: bool(self.api_key.strip()),
            on_identity=self._use_identity,
            config_path=config.path,
            ingress_endpoint=ingress.endpoint,
            renew_before=datetime.timedelta(days=server.renew_before_days),
            reregister_if_deleted=config.api.reregister_if_deleted,
        )
        self.listeners = ListenerSet(
            reactor, self.connector, idle_timeout=server.idle_timeout
        )
        #: Every endpoint's status row, kept as its facts change.
        self.board = StatusBoard(
            lambda: self.listeners.listeners,
            self._overlay,
            lambda: self.listeners.listeners6,
        )
        self.listeners.watch(self.board.listener_changed)
        #: What keeps failing (state files, the hosts file), for status.
        self.problems = Problems(reactor)
        self.interface = InterfaceService(reactor, config.net, network_interface)
        self.hosts = HostsService(
            reactor,
            config.net.hosts_file,
            instance=config.server.instance,
            problems=self.problems,
        )
        self.names = NameService(reactor, config, self.interface)
        self.names.changed = self._names_changed
        self.discovery = EndpointDiscoveryService(
            self._fetch,
            self._poll_answered,
            reactor,
            config.bound_endpoints.poll_interval,
        )
        self.endpoints: dict[str, BoundEndpoint] = {}
        self.skipped: dict[str, str] = {}
        self.plan = Plan({}, {})
        #: The last poll's parsed endpoints and decisions.
        self._replan = Replanner()
        self.allocations = self._saved = allocation.Allocations()
        #: The block of the names' IPv6 addresses (None: IPv6 is off), and
        #: the global ID it was derived from while it is not saved yet.
        self.subnet6: IPNetwork | None = None
        self._unsaved_global_id: int | None = None
        #: The virtual-mode addresses the last reconcile kept.
        self._addresses: frozenset[IPAddress] = frozenset()
        self._latest: list[ApiEndpoint] | None = None
        self._applying = False
        self._applied: list[Deferred[None]] = []
        self._stopping = False
        #: Fires to end the grace of a stop early.
        self._cut: Deferred[None] = Deferred()
        #: When a stop gives up waiting (moved back by the grace).
        self._stop_deadline: IDelayedCall | None = None
        self._polled_operator: str | None = None
        self._started = 0.0
        self._polled = False
        #: The endpoints of the last good poll, re-planned by a reload.
        self._found: list[ApiEndpoint] | None = None
        self._reloading = DeferredLock()
        #: Why the last reload was refused (C{""}: it was not).
        self.config_error = ""
        #: Changed keys that wait for a restart.
        self.restart_pending: tuple[str, ...] = ()
        #: Called with the configuration after each reload.
        self.reconfigured: list[Callable[[Config], object]] = []
        #: Whether the endpoints served are those kept from an earlier run,
        #: not yet confirmed by a poll.
        self.stale = False
        #: The operator and endpoints last kept in the state directory.
        self._kept: tuple[str, list[ApiEndpoint]] | None = None
        self._keeping = DeferredLock()
        #: Called when the daemon begins to stop.
        self.stopping: list[Callable[[], object]] = []

    # Lifecycle

    def startService(self) -> None:
        """
        Take the state directory, then start. Another daemon on the same
        state raises L{StateDirectoryLocked} here, before anything of the
        machine is touched. What needs the CA and state files starts once
        they are read (L{_load_files}).
        """
        try:
            self.state_lock.acquire()
        except StateDirectoryLocked as e:
            if self.exit_when_locked:
                raise SystemExit(f"ngrokd: {e}") from None
            raise
        self._started = self._reactor.seconds()
        was, soft, hard = raise_open_file_limit()
        self.log.info(
            "open files: soft limit {soft} (was {was}), hard limit {hard}",
            soft=soft,
            was=was,
            hard=hard,
        )
        self.file_thread.start()
        super().startService()
        self._load_files()

    def _load_files(self) -> None:
        """
        Read, in the file thread, what the config names and the state
        directory holds: the CA bundles (checked when the config was
        loaded), the IPv6 block's global ID, the allocations and the last
        good list. Then start what needs them: the interface and the hosts
        file (they change the machine), and the identity, which adds the
        discovery service once it has one. Nothing is served before.
        """
        config = self.config

        def read() -> _Files:
            self._check_key_mode(config.server.client_key)
            subnet6, new_global_id = _subnet6(config)
            return _Files(
                load_api_trust(config.api.ca_bundle),
                load_ingress_trust(config.ingress.ca_bundle),
                subnet6,
                new_global_id,
                allocation.load(
                    config.server.state_dir, config.net.subnet, subnet6=subnet6
                ),
                lastgood.load(config.server.state_dir),
            )

        self.file_thread.run(read).addCallback(self._use_files).addErrback(
            self._files_failed
        )

    def _use_files(self, files: _Files) -> None:
        if self._stopping or not self.running:
            return
        self._api_tls.use(files.api_trust)
        self.connector.use_trust(files.ingress_trust)
        self.subnet6 = self.interface.subnet6 = files.subnet6
        self._unsaved_global_id = files.new_global_id
        self.allocations = self._saved = files.allocations
        self._kept = files.kept
        if self.interface.parent is None:
            self.interface.setServiceParent(self)
            self.hosts.setServiceParent(self)
            self.names.setServiceParent(self)
        if self.identity_service.parent is None:
            # Added last, so that an identity found at once can add the
            # discovery service without racing the start of the others.
            self.identity_service.setServiceParent(self)

    def _files_failed(self, failure: Failure) -> None:
        if self._stopping or not self.running:
            return
        if not failure.check(PEMError, OSError):
            self.log.failure("reading the CA and state files failed", failure)
        self.problems.failed(
            _READING,
            failure.getErrorMessage(),
            "nothing is served until ngrokd is restarted with files it can read",
        )

    def _check_key_mode(self, path: str) -> None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return  # not written yet, or unreadable: the identity says why
        if mode & 0o044:
            self.log.warn(
                "the client key {path} is readable by group or others (mode"
                " {mode:04o}): anyone who reads it can use this machine's"
                " bindings; chmod 600 {path}",
                path=path,
                mode=mode,
            )

    def stopService(self) -> Deferred[None]:
        """
        Stop, within L{STOP_TIMEOUT} seconds as a whole beyond the grace
        given to open connections: when a part takes longer, the stop fires
        all the same and says so (the state directory stays locked until
        that part is done, or the process ends).
        """
        stopping: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        bounded: Deferred[None] = Deferred()

        def cut() -> None:
            self.log.error(
                "stopping took longer than {seconds:g}s; stopped without waiting"
                " for the rest, which may leave {left} (replaced at the next"
                " start)",
                seconds=STOP_TIMEOUT,
                left=self._left_behind(),
            )
            bounded.callback(None)

        timer = self._stop_deadline = self._reactor.callLater(STOP_TIMEOUT, cut)

        def finished(result: Failure | None) -> None:
            if timer.active():
                timer.cancel()
                bounded.callback(result)
            elif isinstance(result, Failure):
                self.log.failure("stopping failed", result)

        stopping.addBoth(finished)
        return bounded

    async def _stop(self) -> None:
        # Listeners go first, at once: what comes after may wait (a
        # reconcile under way, a hosts file another process keeps locked).
        # They go before the hosts section and the addresses they use,
        # which the hosts and interface services remove when they stop.
        self._stopping = True
        try:
            for observer in self.stopping:
                observer()
            factories = [x.factory for x in self.listeners.listeners.values()]
            await self.listeners.stop()
            self.connector.pool.stop()  # nothing will take a warm connection
            await self._let_connections_finish(
                [c for factory in factories for c in factory.connections]
            )
            self.connector.stop()
            await self._idle()
            await super().stopService()
            await self.api.close()
        finally:
            # The files are written before another daemon may have them.
            await self.file_thread.stop()
            self.state_lock.release()

    def _left_behind(self) -> str:
        """
        The names and addresses a stop that gives up may leave.
        """
        names = ", ".join(
            f"{name} {ip}"
            for name, ips in sorted(self.hosts.written.items())
            for ip in ips
        )
        addresses = ", ".join(sorted(str(ip) for ip in self._addresses))
        return (
            f"the names {names or '(none)'} in {self.hosts.file.path} and the"
            f" addresses {addresses or '(none)'}"
        )

    def stop_now(self) -> None:
        """
        End the grace of a stop (now, or when it begins): reset every
        connection still open.
        """
        if not self._cut.called:
            self._cut.callback(None)

    async def _let_connections_finish(self, connections: list[LocalProtocol]) -> None:
        """
        Give C{connections} the grace to finish, then reset the rest.
        """
        if not connections:
            return
        grace = self.config.server.shutdown_grace
        if not self._cut.called:
            self.log.info(
                "stopping: {count} open connections have {grace} s to finish",
                count=len(connections),
                grace=grace,
            )
        if self._stop_deadline is not None and self._stop_deadline.active():
            self._stop_deadline.delay(grace)
        timer = self._clock.callLater(grace, self.stop_now)
        finished: Deferred[Any] = DeferredList([c.closed for c in connections])
        await DeferredList([finished, self._cut], fireOnOneCallback=True)
        if timer.active():
            timer.cancel()
        left = [c for c in connections if not c.closed.called]
        if left:
            self.log.warn(
                "stopping: reset {count} connections still open after the grace"
                " of {grace} s",
                count=len(left),
                grace=grace,
            )
            for connection in left:
                connection.abort()
            await DeferredList([c.closed for c in left])

    # Status

    def endpoint_status(self) -> tuple[EndpointStatus, ...]:
        """
        What every endpoint of the last good poll is doing (the kept rows).
        """
        return self.board.rows()

    def _overlay(self) -> tuple[str, bool]:
        """
        What every row shows of the daemon: the expired certificate, the
        endpoints kept from an earlier run.
        """
        identity = self.identity_service
        return identity.error if identity.state == EXPIRED else "", self.stale

    async def _make_rows(self) -> None:
        """
        Make the status rows a reconcile changed, L{ROWS_AT_ONCE} at a
        time, with a turn of the reactor between: connections keep flowing
        while thousands change.
        """
        board = self.board
        board.refresh(ROWS_AT_ONCE)
        while board.pending:
            await deferLater(self._reactor, 0, lambda: None)
            board.refresh(ROWS_AT_ONCE)

    def daemon_status(self) -> DaemonStatus:
        """
        The daemon as a whole, now.
        """
        identity = self.identity_service.status()
        specs = self.plan.specs
        expires = identity.not_after
        names = self.names.status()
        virtual = self.board.virtual > 0
        return DaemonStatus(
            version=__version__,
            started=self._started,
            now=self._reactor.seconds(),
            identity_state=identity.state,
            operator_id=identity.operator_id,
            certificate_expires=expires.timestamp() if expires else None,
            identity_error=identity.error,
            ingress_endpoint=self.config.ingress.endpoint,
            polled=self._polled,
            last_poll=self.discovery.last_success,
            poll_error=self.discovery.last_error,
            poll_failures=self.discovery.failures,
            endpoints=len(self.endpoints) + len(self.skipped),
            listeners_planned=len(specs),
            listeners_up=self.board.listeners_up,
            config_error=self.config_error,
            restart_pending=self.restart_pending,
            stale=self.stale,
            warm_connections=self.connector.pool.ready,
            listeners_unplanned=len(self.plan.failures) - len(self.plan.refused),
            names_error=self.hosts.error if virtual else "",
            problems=self.problems.current(),
            names_via=names.via,
            names_fallback=names.fallback if virtual else "",
            names_strict=names.strict,
            ipv6_subnet=str(self.subnet6 or ""),
            ipv6_error=self.interface.ipv6_error,
        )

    # Reload

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read the config file again and apply what changed: hot keys at once
        (listeners rebound only where their address or port changed),
        restart-only keys reported and left as they are. An invalid file
        changes nothing. Reloads run one at a time.
        """
        return self._reloading.run(lambda: Deferred.fromCoroutine(self._reload()))

    async def _reload(self) -> ReloadResult:
        path = self.config.path
        try:
            # Not in the reactor's pool: a stop would wait for a read that
            # never ends (a hung filesystem), and the process with it.
            loaded = await in_own_thread(
                self._reactor,
                self._clock,
                READ_TIMEOUT,
                partial(load_config, path, instance=self.instance_option),
                lambda: ConfigError(f"{path}: not read within {READ_TIMEOUT:g}s"),
            )
        except ConfigError as e:
            self.config_error = str(e)
            self.log.error(
                "reload refused, still running with the previous configuration:"
                " {error}",
                error=e,
            )
            return ReloadResult(error=str(e))
        for warning in loaded.warnings:
            self.log.warn("configuration: {problem}", problem=warning)
        found = changes(self.config, loaded.config)
        self.config_error = ""
        self.restart_pending = tuple(sorted(found.restart))
        for line in found.described():
            self.log.info("reload: {change}", change=line)
        if not found:
            self.log.info("reload: {path} has no changes", path=path)
        if found.hot:
            await self._use(applied(self.config, loaded.config), found.hot)
        return ReloadResult(
            applied=tuple(sorted(found.hot)), restart=self.restart_pending
        )

    async def _use(self, config: Config, changed: Mapping[str, object]) -> None:
        """
        Run with C{config}, whose C{changed} keys differ from the running one.
        """
        self.config = config
        pool = self._reactor.getThreadPool()
        if changed.keys() & _API_CLIENT_KEYS:
            tls = LateTrustPolicy()
            tls.use(
                await deferToThreadPool(
                    self._reactor, pool, load_api_trust, config.api.ca_bundle
                )
            )
            old, self._api_tls = self.api, tls
            self.api = self._api_client(lambda: self.api_key)
            self.identity_service.use_api(self.api)
            await old.close()
        if "ingress.ca_bundle" in changed:
            self.connector.use_trust(
                await deferToThreadPool(
                    self._reactor, pool, load_ingress_trust, config.ingress.ca_bundle
                )
            )
        ingress = config.ingress
        if changed.keys() & {"ingress.connect_timeout", "ingress.upgrade_timeout"}:
            self.connector.set_timeouts(
                ingress.connect_timeout, ingress.upgrade_timeout
            )
        if any(key.startswith("ingress.pool_") for key in changed):
            self.connector.pool.configure(_pool_settings(config))
        if "ingress.early_data" in changed:
            self.connector.early_data = ingress.early_data
        if changed.keys() & _IDENTITY_KEYS:
            # It asks ngrok again: only when what it sends or decides changed.
            self.identity_service.reconfigure(
                config.bound_endpoints.selectors,
                datetime.timedelta(days=config.server.renew_before_days),
                config.api.reregister_if_deleted,
            )
        if "api.key" in changed:
            self.api_key = config.api.key
            self.identity_service.key_changed()
        if "bound_endpoints.poll_interval" in changed:
            self.discovery.set_interval(config.bound_endpoints.poll_interval)
        self.names.reconfigure(config)
        for observer in self.reconfigured:
            observer(config)
        if self._found is not None and changed.keys() & _PLAN_KEYS:
            await self.reconcile(self._found)

    # Identity

    @property
    def identity(self) -> Identity | None:
        return self.identity_service.identity

    @property
    def registered(self) -> bool:
        return self.identity is not None

    def set_api_key(self, key: str) -> Deferred[None]:
        """
        Use C{key} for the ngrok API from now on, once it has proved to work:
        when not registered, by registering with it; otherwise by finding
        this machine's operator in its account. Until then, and if it fails
        (with the reason), nothing changes, so the caller may persist the
        key only after success. The key is never logged.
        """
        key = key.strip()
        if not key:
            return fail(NoAPIKey())
        trial = self._api_client(lambda: key)

        def accepted(_: object) -> None:
            self.api_key = key
            # As the file will say once saved: its reload changes nothing.
            self.config = attrs.evolve(
                self.config, api=attrs.evolve(self.config.api, key=key)
            )
            self.log.info("a new ngrok API key is in use")
            self.identity_service.key_changed()
            self.discovery.poll_now()

        def close(result: object) -> Deferred[object]:
            return trial.close().addBoth(lambda _: result)

        trying = self.identity_service.try_api(trial)
        trying.addCallback(accepted)
        trying.addBoth(close)
        return trying

    def _api_client(self, key_provider: Callable[[], str]) -> NgrokAPI:
        api, discovery = self.config.api, self.config.bound_endpoints
        return make_api(
            self._reactor,
            api.url,
            key_provider,
            self._api_tls,
            api.timeout,
            max_items=discovery.max_endpoints,
            listing_timeout=discovery.poll_timeout,
            on_answer=lambda: self.identity_service.api_answered(),
        )

    def _use_identity(self, identity: Identity) -> None:
        """
        New connections to the ingress use C{identity}'s certificate (those
        open keep theirs); a new operator's endpoints are polled at once.
        """
        polled = self._polled_operator
        self.connector.use_certificate(identity.cert_pem, identity.key_pem)
        if not self.running:
            return
        if self.discovery.parent is None:
            self._serve_kept(identity.operator_id)
            self.discovery.setServiceParent(self)
        elif polled is not None and polled != identity.operator_id:
            self.discovery.poll_now()

    # Discovery and reconcile

    def _fetch(self) -> Deferred[list[ApiEndpoint]]:
        identity = self.identity
        assert identity is not None
        operator_id = self._polled_operator = identity.operator_id

        def failed(failure: Failure) -> Failure:
            # Is the operator gone, or was this 404 about something else?
            error = failure.value
            if isinstance(error, APIError) and error.status == 404:
                self.identity_service.check_operator(operator_id)
            return failure

        return self.api.bound_endpoints(operator_id).addErrback(failed)

    def _serve_kept(self, operator_id: str) -> None:
        """
        Until the first good poll, serve the endpoints an earlier run kept
        for this operator, marked stale: the API may be down while the
        ingress works.
        """
        kept = self._kept
        if kept is None or kept[0] != operator_id:
            return
        self.stale = True
        self.log.info(
            "serving the {count} endpoints of the last good poll, kept in"
            " {path}, until the ngrok API answers",
            count=len(kept[1]),
            path=os.path.join(self.config.server.state_dir, lastgood.LAST_GOOD),
        )
        self.reconcile(kept[1])

    def _poll_answered(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        A good poll: serve it (no longer stale), and keep it for a restart
        if it changed, off the reactor thread (it waits for fsync), one
        write at a time.
        """
        self.stale = False
        operator_id = self._polled_operator
        if operator_id is not None and self._kept != (operator_id, found):
            self._kept = (operator_id, found)
            self._keeping.run(
                deferToThreadPool,
                self._reactor,
                self._reactor.getThreadPool(),
                lastgood.save,
                self.config.server.state_dir,
                operator_id,
                found,
            ).addCallbacks(self._kept_saved, self._keep_failed)
        return self.reconcile(found)

    def _kept_saved(self, _: object) -> None:
        self.problems.cleared(_KEEPING)

    def _keep_failed(self, failure: Failure) -> None:
        failure.trap(AtomicWriteError)
        self._kept = None
        self.problems.failed(
            _KEEPING,
            str(failure.value),
            "a restart while the ngrok API is down will serve nothing until it answers",
        )

    def reconcile(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        Serve exactly the endpoints of one good poll.

        Reconciles never overlap: a result that arrives while one is applied
        waits, and of those waiting only the latest is applied. Fires (never
        fails) once C{found} or a later result is applied; once the daemon
        stops, results are ignored.
        """
        if self._stopping:
            return succeed(None)
        self._latest = self._found = found
        applied = self._idle()
        if not self._applying:
            self._applying = True
            Deferred.fromCoroutine(self._apply_latest())
        return applied

    def _idle(self) -> Deferred[None]:
        """
        Fires when no reconcile is being applied (or waits to be). Cancelling
        it stops the wait, not the reconcile.
        """
        if not self._applying and self._latest is None:
            return succeed(None)
        idle: Deferred[None] = Deferred(self._applied.remove)
        self._applied.append(idle)
        return idle

    async def _apply_latest(self) -> None:
        try:
            while self._latest is not None:
                found, self._latest = self._latest, None
                try:
                    await self._apply(found)
                except Exception:
                    self.log.failure("applying the bound endpoints failed")
        finally:
            self._applying = False
            applied, self._applied = self._applied, []
            for d in applied:
                d.callback(None)

    async def _apply(self, found: list[ApiEndpoint]) -> None:
        """
        Allocate (and persist), then set up the addresses (the DNS server's
        too), then listen, then serve the names (the DNS server's table and
        its registration, then the hosts file for what DNS does not serve):
        a name resolves only once its address and listener exist. A name the
        hosts file already sets, or that is otherwise not ours
        (L{ngrokd.names}), gets none of them. Addresses no hostname uses any
        more go last, after their listeners and names.
        """
        endpoints, skipped = await self._parse(found)
        self.endpoints, self.skipped = endpoints, skipped
        self.board.reconciled(endpoints, skipped, self.plan)
        net = self.config.net
        names = name_rules(self.config, await self.hosts.pinned())
        decide = partial(
            self._replan.decide,
            endpoints,
            self.allocations,
            net,
            names,
            self._reactor.seconds(),
            self.subnet6,
        )
        if len(endpoints) >= DECIDE_IN_THREAD:
            pool = self._reactor.getThreadPool()
            result, planned = await deferToThreadPool(self._reactor, pool, decide)
        else:
            result, planned = decide()
        self.allocations = result.allocations
        await self._save_allocations()
        addresses = frozenset(
            [*self.allocations.ips.values(), *self.allocations.ips6.values()]
        )
        addresses |= self.names.own_addresses()
        missing = await self.interface.ensure(addresses | self._addresses)
        if self._stopping:
            # The listeners are closed, and the names go with the stop.
            return
        previous = self.plan
        self.plan = self._replan.served(
            planned, {str(ip): reason for ip, reason in missing.items()}
        )
        if self.plan is not previous:
            self.board.reconciled(self.endpoints, self.skipped, self.plan)
            for url, reason in self.plan.failures.items():
                if previous.failures.get(url) != reason:
                    self.log.error(
                        "cannot serve {url}: {reason}", url=url, reason=reason
                    )
        await self._make_rows()
        board = self.board
        if (
            self.plan is not previous
            or board.listeners_up < len(self.plan.specs)
            or board.listeners6_up < len(self.plan.specs6)
        ):
            # Unchanged and all listening, there is nothing to do.
            await self.listeners.reconcile(self.plan.specs, self.plan.specs6)
        if self._stopping:
            await self.listeners.stop()
            return
        name_addresses, virtual_names = self._replan.names(self.plan)
        await self.names.apply(name_addresses)
        await self.hosts.write(self.names.hosts_names(virtual_names))
        self.board.named(self.names.unnamed(list(virtual_names)))
        await self._make_rows()
        if self._addresses - addresses:
            await self.interface.ensure(addresses)
        self._addresses = addresses
        self._polled = True
        if self.plan is not previous and self.freeze_after_changes:
            # What a changed reconcile made lives long (listeners, rows):
            # out of the way of the collector, whose full passes over
            # 10,000 endpoints' objects would stop everything for 200 ms.
            gc.collect(1)
            gc.freeze()

    async def _parse(
        self, found: list[ApiEndpoint]
    ) -> tuple[dict[str, BoundEndpoint], dict[str, str]]:
        """
        The endpoints of C{found} by id, and why the others are skipped:
        records unchanged since the last poll keep their parsed endpoint,
        new ones are parsed L{ROWS_AT_ONCE} at a time, with a turn of the
        reactor between. Equal to the last poll's, the last poll's dicts.
        """
        endpoints: dict[str, BoundEndpoint] = {}
        skipped: dict[str, str] = {}
        for start in range(0, len(found), ROWS_AT_ONCE):
            batch = found[start : start + ROWS_AT_ONCE]
            new = self._replan.parse(batch, endpoints, skipped)
            if new and len(found) > ROWS_AT_ONCE:
                await deferLater(self._reactor, 0, lambda: None)
        self._replan.parsed([*endpoints, *skipped])
        for id, reason in skipped.items():
            if self.skipped.get(id) != reason:
                self.log.warn("skipping endpoint {id}: {error}", id=id, error=reason)
        if endpoints == self.endpoints:
            endpoints = self.endpoints
        if skipped == self.skipped:
            skipped = self.skipped
        return endpoints, skipped

    def _names_changed(self) -> None:
        """
        How names reach the system changed by itself (systemd-resolved left
        or came back): serve the names again, the hosts file as it now must.
        """
        if self._found is not None and not self._stopping:
            self.reconcile(self._found)

    async def _save_allocations(self) -> None:
        """
        Persist the allocations if they changed, off the reactor thread (it
        waits for fsync). When that fails they are used all the same, and
        saving is tried again at the next reconcile.
        """
        allocations, global_id = self.allocations, self._unsaved_global_id
        if allocations == self._saved and global_id is None:
            self.problems.cleared(_SAVING)
            return
        try:
            await deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                _save_state,
                self.config.server.state_dir,
                allocations,
                global_id,
            )
        except AtomicWriteError as e:
            self.problems.failed(
                _SAVING,
                str(e),
                "the addresses and ports given out since the last save may"
                " change at the next start",
            )
            return
        self._saved = allocations
        if self._unsaved_global_id == global_id:
            self._unsaved_global_id = None
        self.problems.cleared(_SAVING)


def _subnet6(config: Config) -> tuple[IPNetwork | None, int | None]:
    """
    C{net.subnet6}; for C{auto}, the block of the global ID kept in the
    state directory, or of a new one, returned beside it (it is saved with
    the allocations). This reads a file: call it off the reactor thread.
    """
    subnet6 = config.net.subnet6
    if subnet6 == SUBNET6_OFF:
        return None, None
    if subnet6 != SUBNET6_AUTO:
        assert not isinstance(subnet6, str)
        return subnet6, None
    global_id = ula.load(config.server.state_dir)
    if global_id is None:
        new = ula.new_global_id()
        return ula.derive(new), new
    return ula.derive(global_id), None


def _save_state(
    state_dir: str, allocations: allocation.Allocations, global_id: int | None
) -> None:
    """
    Save the IPv6 global ID, if new, then the allocations built on it.
    """
    if global_id is not None:
        ula.save(state_dir, global_id)
    allocation.save(state_dir, allocations)


class StopOnSignal(Service):
    """
    SIGTERM and SIGINT: the first stops the reactor, and so the daemon, with
    its grace for open connections; the next one ends that grace at once.

    The handlers only hand the signal to the reactor thread: nothing is
    logged and no lock is taken inside a handler, which runs in the middle
    of whatever the main thread was doing, a log line's write included. (The
    reactor's own handlers log there, and a second signal during that write
    can deadlock on the log file's lock.) They are installed as the service
    tree is prepared, before the reactor runs, so that a signal during the
    start still stops the daemon cleanly, and again right after the reactor
    puts its own SIGTERM handler in place as it starts. A signal in between
    (a few instructions, while nothing logs) meets the reactor's handler,
    which stops the reactor too: the stop asked for here then finds it
    stopping already.
    """

    log = Logger()

    def __init__(
        self,
        daemon: Daemon,
        reactor: Any,
        install: Callable[[int, Any], object] = signal.signal,
    ) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self._install = install
        self._received = 0

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._install_handlers()
        if not self._reactor.running:
            # After the reactor's own trigger, which installs its handlers.
            self._reactor.addSystemEventTrigger(
                "during", "startup", self._install_handlers
            )

    def _install_handlers(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self._install(number, self._handler)

    def _handler(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.received, number)

    def received(self, number: int) -> None:
        """
        Act on signal C{number}, on the reactor thread.
        """
        self._received += 1
        name = signal.Signals(number).name
        if self._received == 1:
            self.log.info(
                "send {signal} again to reset open connections at once",
                signal=name,
            )
            # twistd ends by the signal the reactor keeps here (where its own
            # handlers keep theirs), as systemd expects.
            if self._reactor._exitSignal is None:
                self._reactor._exitSignal = number
            self._reactor.callFromThread(self._stop_reactor)
        else:
            self.log.info(
                "received {signal} again: resetting open connections", signal=name
            )
            self._daemon.stop_now()

    def _stop_reactor(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already: the reactor's own handler took a signal


def _pool_settings(config: Config) -> PoolSettings:
    ingress = config.ingress
    return PoolSettings(
        ingress.pool_size,
        ingress.pool_idle_timeout,
        ingress.pool_max_age,
        ingress.pool_linger,
    )
