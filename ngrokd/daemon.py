# -*- test-case-name: ngrokd.test.test_daemon_net,ngrokd.test.test_daemon_e2e -*-
"""
The daemon: who this machine is to ngrok, which endpoints it serves, where.

L{Daemon} composes the services and owns the state: the identity
(certificate and operator id, registered through the API when missing), the
discovery poll, the plan from endpoints to listeners, the virtual-mode
addresses, the names (the DNS server and its registration,
L{ngrokd.host.nameservice}, and the hosts file for what DNS does not serve),
and the listeners that bridge each accepted connection to the binding
ingress. Data flows one way: poll -> parse -> allocate -> plan -> addresses
-> listeners -> names. A failed poll or registration never stops what
already works.

Each job has a collaborator of its own, which acts on the daemon's state:
what is read at start (L{ngrokd.startfiles}), the API key, the identity and
the kept list (L{ngrokd.registration}), the reconcile (L{ngrokd.applier}),
the reload (L{ngrokd.reload}) and the bounded stop (L{ngrokd.stopping}).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from functools import partial
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ngrokd import __version__
from ngrokd.applier import Applier
from ngrokd.blocking import BlockingPool, one_thread
from ngrokd.board import StatusBoard
from ngrokd.config import Config
from ngrokd.datapath.descriptors import raise_open_file_limit
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.listeners import ListenerSet
from ngrokd.endpoints import BoundEndpoint
from ngrokd.host import allocation
from ngrokd.host.allocation import IPNetwork
from ngrokd.host.hosts import HostsService
from ngrokd.host.nameservice import NameService
from ngrokd.host.netif import INetworkInterface
from ngrokd.host.netif.service import InterfaceService
from ngrokd.host.statelock import StateDirectoryLocked, StateLock
from ngrokd.ngrok.api import ApiEndpoint, NgrokAPI
from ngrokd.ngrok.discovery import EndpointDiscoveryService
from ngrokd.ngrok.identity import Identity, IdentityStore
from ngrokd.ngrok.identity_service import EXPIRED, IdentityService
from ngrokd.pem import PEMError
from ngrokd.plan import Plan
from ngrokd.problems import Problems
from ngrokd.reactor import IDaemonReactor
from ngrokd.registration import Registration
from ngrokd.reload import Reloader, ReloadResult, pool_settings
from ngrokd.servicetree import Parent, attach
from ngrokd.startfiles import StartFiles, read_start_files
from ngrokd.status import DaemonStatus, EndpointStatus
from ngrokd.stopping import Stopper

#: Seconds a stop may take as a whole (listeners, hosts file, addresses).
STOP_TIMEOUT = 60.0

#: What fails when the start's files cannot be read, for status and the log.
_READING = "reading the CA and state files at start"


class Daemon(Parent):
    """
    The whole daemon, as one service tree.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorCore,
        network_interface: INetworkInterface | None = None,
        clock: IReactorTime | None = None,
        threadpool: Callable[[str], ThreadPool] = one_thread,
    ) -> None:
        """
        @param reactor: runs the daemon; besides L{IReactorCore}, it
            provides the rest of L{IDaemonReactor}, as twistd's reactors do.
        @param network_interface: carries the virtual-mode addresses (by
            default the platform's; tests give another).
        @param clock: times the grace given to open connections when
            stopping, and a reload's read of the file (by default the
            reactor).
        @param threadpool: makes the pool of the thread that reads and
            writes the daemon's files while it runs (by default one thread).
        """
        super().__init__()
        self.config = config
        #: The C{--instance} option, kept for every reload of the file.
        self.instance_option: str | None = None
        self._reactor = daemon_reactor = cast(IDaemonReactor, reactor)
        clock = clock if clock is not None else daemon_reactor
        self.registration = Registration(self, daemon_reactor)
        self.applier = Applier(self, daemon_reactor)
        self.reloader = Reloader(self, daemon_reactor, clock)
        self.stopper = Stopper(
            self, daemon_reactor, clock, partial(Parent.stopService, self)
        )
        self.api_key = config.api.key
        self.api: NgrokAPI = self.registration.client(lambda: self.api_key)
        ingress = config.ingress
        self.connector = IngressConnector(
            daemon_reactor,
            ingress.host,
            ingress.port,
            connect_timeout=ingress.connect_timeout,
            upgrade_timeout=ingress.upgrade_timeout,
            insecure_skip_verify=ingress.insecure_skip_verify,
            max_pending=ingress.max_pending_dials,
            queue_timeout=ingress.dial_queue_timeout,
            pool=pool_settings(config),
            early_data=ingress.early_data,
        )
        server = config.server
        #: Reads and writes the CA and state files, off the reactor thread.
        self.file_thread = BlockingPool(daemon_reactor, "ngrokd-files", threadpool)
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
            daemon_reactor,
            in_thread=self.file_thread.run,
            selectors=config.bound_endpoints.selectors,
            hostname=socket.gethostname(),
            has_key=lambda: bool(self.api_key.strip()),
            on_identity=self.registration.use_identity,
            config_path=config.path,
            ingress_endpoint=ingress.endpoint,
            renew_before=datetime.timedelta(days=server.renew_before_days),
            reregister_if_deleted=config.api.reregister_if_deleted,
        )
        self.listeners = ListenerSet(
            daemon_reactor, self.connector, idle_timeout=server.idle_timeout
        )
        #: Every endpoint's status row, kept as its facts change.
        self.board = StatusBoard(
            lambda: self.listeners.listeners,
            self._overlay,
            lambda: self.listeners.listeners6,
        )
        self.listeners.watch(self.board.listener_changed)
        #: What keeps failing (state files, the hosts file), for status.
        self.problems = Problems(daemon_reactor)
        self.interface = InterfaceService(daemon_reactor, config.net, network_interface)
        self.hosts = HostsService(
            daemon_reactor,
            config.net.hosts_file,
            instance=config.server.instance,
            problems=self.problems,
        )
        self.names = NameService(daemon_reactor, config, self.interface)
        # How names reach the system changed by itself (systemd-resolved
        # left or came back): serve the names again, as they now must.
        self.names.changed = self.applier.again
        self.discovery = EndpointDiscoveryService(
            self.registration.fetch,
            self.registration.answered,
            daemon_reactor,
            config.bound_endpoints.poll_interval,
        )
        self.endpoints: dict[str, BoundEndpoint] = {}
        self.skipped: dict[str, str] = {}
        self.plan = Plan({}, {})
        self.allocations = allocation.Allocations()
        #: The block of the names' IPv6 addresses (None: IPv6 is off).
        self.subnet6: IPNetwork | None = None
        self._started = 0.0
        #: Why the last reload was refused (C{""}: it was not).
        self.config_error = ""
        #: Changed keys that wait for a restart.
        self.restart_pending: tuple[str, ...] = ()
        #: Called with the configuration after each reload.
        self.reconfigured: list[Callable[[Config], object]] = []
        #: Whether the endpoints served are those kept from an earlier run,
        #: not yet confirmed by a poll.
        self.stale = False
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
        directory holds (L{read_start_files}). Then start what needs them:
        the interface and the hosts file (they change the machine), and the
        identity, which adds the discovery service once it has one. Nothing
        is served before.
        """
        self.file_thread.run(read_start_files, self.config).addCallback(
            self._use_files
        ).addErrback(self._files_failed)

    def _use_files(self, files: StartFiles) -> None:
        if self.stopper.begun or not self.running:
            return
        self.registration.api_tls.use(files.api_trust)
        self.connector.use_trust(files.ingress_trust)
        self.subnet6 = self.interface.subnet6 = files.subnet6
        self.allocations = files.allocations
        self.applier.loaded(files.allocations, files.new_global_id)
        self.registration.kept = files.kept
        if self.interface.parent is None:
            attach(self.interface, self)
            attach(self.hosts, self)
            attach(self.names, self)
        if self.identity_service.parent is None:
            # Added last, so that an identity found at once can add the
            # discovery service without racing the start of the others.
            attach(self.identity_service, self)

    def _files_failed(self, failure: Failure) -> None:
        if self.stopper.begun or not self.running:
            return
        if not failure.check(PEMError, OSError):
            self.log.failure("reading the CA and state files failed", failure)
        self.problems.failed(
            _READING,
            failure.getErrorMessage(),
            "nothing is served until ngrokd is restarted with files it can read",
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop, within L{STOP_TIMEOUT} seconds as a whole beyond the grace
        given to open connections (L{Stopper}).
        """
        return self.stopper.stop(STOP_TIMEOUT)

    def stop_now(self) -> None:
        """
        End the grace of a stop (now, or when it begins): reset every
        connection still open.
        """
        self.stopper.stop_now()

    # The jobs of the collaborators

    def reconcile(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        Serve exactly the endpoints of one good poll (L{Applier.reconcile}).
        """
        return self.applier.reconcile(found)

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read the config file again and apply what changed
        (L{Reloader.reload}).
        """
        return self.reloader.reload()

    def set_api_key(self, key: str) -> Deferred[None]:
        """
        Use C{key} for the ngrok API once it has proved to work
        (L{Registration.set_api_key}).
        """
        return self.registration.set_api_key(key)

    @property
    def identity(self) -> Identity | None:
        return self.identity_service.identity

    @property
    def registered(self) -> bool:
        return self.identity is not None

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
            polled=self.applier.polled,
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
