# -*- test-case-name: ngrokd.test.test_daemon -*-
"""
The daemon: who this machine is to ngrok, which endpoints it serves, where.

L{Daemon} owns the state and wires the pieces: the identity (certificate and
operator id, registered through the API when missing), the discovery poll, the
plan from endpoints to listeners, and the listeners that bridge each accepted
connection to the binding ingress. Data flows one way: poll -> parse -> plan ->
apply. A failed poll or registration never stops what already works.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ngrokd import allocation
from ngrokd.api import ApiEndpoint, NgrokAPI, make_api
from ngrokd.config import Config
from ngrokd.discovery import EndpointDiscoveryService
from ngrokd.endpoints import BoundEndpoint, EndpointURLError, parse_endpoint_url
from ngrokd.identity import (
    Identity,
    IdentityError,
    IdentityStore,
    RepairNeeded,
    register,
    repair,
)
from ngrokd.ingress import IngressConnector
from ngrokd.listeners import ListenerSet
from ngrokd.plan import VIRTUAL, Plan, listen_mode, plan, targets
from ngrokd.trust import load_trust


class Daemon(MultiService):
    """
    The whole daemon, as one service tree.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.api_key = config.api.key
        server = config.server
        self.store = IdentityStore(
            server.state_dir, server.client_cert, server.client_key
        )
        self.identity: Identity | None = None
        self.registration_error = ""
        self.api: NgrokAPI = make_api(
            reactor, config.api.url, lambda: self.api_key, config.api.ca_bundle
        )
        ingress = config.ingress
        self.connector = IngressConnector(
            reactor,
            ingress.host,
            ingress.port,
            load_trust(ingress.ca_bundle),
            connect_timeout=ingress.connect_timeout,
            upgrade_timeout=ingress.upgrade_timeout,
            insecure_skip_verify=ingress.insecure_skip_verify,
        )
        self.listeners = ListenerSet(reactor, self.connector)
        self.discovery = EndpointDiscoveryService(
            self._fetch,
            self.reconcile,
            reactor,
            config.bound_endpoints.poll_interval,
        )
        self.endpoints: dict[str, BoundEndpoint] = {}
        self.skipped: dict[str, str] = {}
        self.plan = Plan({}, {})
        self.allocations = allocation.load(config.server.state_dir, config.net.subnet)
        self._register_attempts = 0
        self._retry: IDelayedCall | None = None
        self._reconciling: Deferred[None] | None = None

    # Lifecycle

    def startService(self) -> None:
        super().startService()
        self._start_identity()

    def stopService(self) -> Deferred[None]:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        stopping: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return stopping

    async def _stop(self) -> None:
        await super().stopService()
        await self.listeners.stop()
        await self.api.close()

    # Identity

    @property
    def registered(self) -> bool:
        return self.identity is not None

    def _start_identity(self) -> None:
        try:
            state = self.store.load()
        except IdentityError as e:
            self.registration_error = str(e)
            self.log.error("cannot use the stored identity: {error}", error=e)
            return
        if isinstance(state, Identity):
            self._use_identity(state)
        elif not self.api_key:
            self.log.warn(
                "not registered, waiting for an API key (api.key in {config},"
                " NGROK_API_KEY, or ngrokctl set-api-key)",
                config=self.config.path,
            )
        else:
            self._register()

    def _register(self) -> None:
        """
        Register, or finish an identity a crash left half-written.
        """
        self._retry = None
        selectors = self.config.bound_endpoints.selectors
        state = self.store.load()
        if isinstance(state, RepairNeeded):
            self.log.warn(
                "repairing the stored identity: {reason}", reason=state.reason
            )
            d = repair(self.api, self.store, state, selectors, socket.gethostname())
        else:
            d = register(self.api, self.store, selectors, socket.gethostname())
        d.addCallbacks(self._use_identity, self._registration_failed)

    def _registration_failed(self, failure: Any) -> None:
        self._register_attempts += 1
        self.registration_error = failure.getErrorMessage()
        delay = backoffPolicy(initialDelay=2.0, maxDelay=300.0)(self._register_attempts)
        self.log.error(
            "registering with the ngrok API failed: {error}; retrying in {delay:.0f}s",
            error=self.registration_error,
            delay=delay,
        )
        if self.running:
            self._retry = self._reactor.callLater(delay, self._register)

    def _use_identity(self, identity: Identity) -> None:
        self.identity = identity
        self.registration_error = ""
        self.connector.use_certificate(identity.cert_pem, identity.key_pem)
        self.log.info(
            "registered as operator {operator_id}", operator_id=identity.operator_id
        )
        if self.running and self.discovery.parent is None:
            self.discovery.setServiceParent(self)

    # Discovery and reconcile

    def _fetch(self) -> Deferred[list[ApiEndpoint]]:
        assert self.identity is not None
        return self.api.bound_endpoints(self.identity.operator_id)

    def reconcile(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        Serve exactly the endpoints of one good poll.
        """
        endpoints: dict[str, BoundEndpoint] = {}
        skipped: dict[str, str] = {}
        for record in found:
            try:
                target = parse_endpoint_url(record.url, record.proto)
            except EndpointURLError as e:
                skipped[record.id] = str(e)
                if self.skipped.get(record.id) != str(e):
                    self.log.warn(
                        "skipping endpoint {id}: {error}", id=record.id, error=e
                    )
                continue
            endpoints[record.id] = BoundEndpoint(record.id, record.url, target)
        self.endpoints, self.skipped = endpoints, skipped
        net = self.config.net
        wanted_ips: set[str] = set()
        wanted_ports: set[tuple[str, int]] = set()
        for target in targets(endpoints.values()).values():
            mode = listen_mode(target.host, net.listen_interface, net.overrides)
            if mode == VIRTUAL:
                wanted_ips.add(target.host)
            else:
                wanted_ports.add((target.host, target.port))
        result = allocation.allocate(
            self.allocations, wanted_ips, wanted_ports, net.subnet, net.start_port
        )
        if result.allocations != self.allocations:
            self.allocations = result.allocations
            allocation.save(self.config.server.state_dir, self.allocations)
        self.plan = plan(
            endpoints.values(),
            net.listen_interface,
            net.overrides,
            self.allocations.ips,
            self.allocations.network_ports,
        )
        for url, reason in self.plan.failures.items():
            self.log.error("cannot serve {url}: {reason}", url=url, reason=reason)
        return self.listeners.reconcile(self.plan.specs)
