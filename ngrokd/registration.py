# -*- test-case-name: ngrokd.test.test_daemon_net,ngrokd.test.test_reconcile_e2e -*-
"""
The daemon with ngrok's API: the client and its key, what a new identity
changes, and the endpoints the polls list, kept for a restart.

The identity service (L{ngrokd.ngrok.identity_service}) decides who this
machine is; the discovery service polls. What is here joins them to the
daemon: a new API key is used only once it has proved to work, a new
identity's certificate goes to the ingress connector and its operator's
endpoints are polled, and the last good list is kept in the state
directory so that a restart while the API is down still serves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.atomic import AtomicWriteError
from ngrokd.ngrok import lastgood
from ngrokd.ngrok.api import ApiEndpoint, APIError, NgrokAPI, NoAPIKey, make_api
from ngrokd.ngrok.identity import Identity
from ngrokd.ngrok.trust import LateTrustPolicy, TrustRoot
from ngrokd.reactor import IDaemonReactor
from ngrokd.servicetree import attach

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon

#: What fails when the last good list cannot be written, for status and
#: the log.
_KEEPING = "keeping the last good list of endpoints"


class Registration:
    """
    The API side of one L{Daemon}.

    @ivar api_tls: how the API client checks the API's certificate (its
        trust given once the CA files are read).
    @ivar kept: the operator and endpoints last kept in the state directory.
    """

    log = Logger()

    def __init__(self, daemon: Daemon, reactor: IDaemonReactor) -> None:
        self._daemon = daemon
        self._reactor = reactor
        self.api_tls = LateTrustPolicy()
        self.kept: tuple[str, list[ApiEndpoint]] | None = None
        self._keeping = DeferredLock()
        self._polled_operator: str | None = None

    def client(self, key_provider: Callable[[], str]) -> NgrokAPI:
        """
        An API client as the configuration says, its key from
        C{key_provider}.
        """
        daemon = self._daemon
        api, discovery = daemon.config.api, daemon.config.bound_endpoints
        return make_api(
            self._reactor,
            api.url,
            key_provider,
            self.api_tls,
            api.timeout,
            max_items=discovery.max_endpoints,
            listing_timeout=discovery.poll_timeout,
            on_answer=lambda: daemon.identity_service.api_answered(),
        )

    async def renew_client(self, trust: TrustRoot) -> None:
        """
        Use a new API client, made as the configuration now says, checking
        the API's certificate with C{trust}; close the old one.
        """
        daemon = self._daemon
        tls = LateTrustPolicy()
        tls.use(trust)
        old, self.api_tls = daemon.api, tls
        daemon.api = self.client(lambda: daemon.api_key)
        daemon.identity_service.use_api(daemon.api)
        await old.close()

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
        daemon = self._daemon
        trial = self.client(lambda: key)

        def accepted(_: object) -> None:
            daemon.api_key = key
            # As the file will say once saved: its reload changes nothing.
            daemon.config = attrs.evolve(
                daemon.config, api=attrs.evolve(daemon.config.api, key=key)
            )
            self.log.info("a new ngrok API key is in use")
            daemon.identity_service.key_changed()
            daemon.discovery.poll_now()

        def close(result: object) -> Deferred[object]:
            return trial.close().addBoth(lambda _: result)

        trying = daemon.identity_service.try_api(trial)
        trying.addCallback(accepted)
        trying.addBoth(close)
        return trying

    def use_identity(self, identity: Identity) -> None:
        """
        New connections to the ingress use C{identity}'s certificate (those
        open keep theirs); a new operator's endpoints are polled at once.
        """
        daemon = self._daemon
        polled = self._polled_operator
        daemon.connector.use_certificate(identity.cert_pem, identity.key_pem)
        if not daemon.running:
            return
        if daemon.discovery.parent is None:
            self._serve_kept(identity.operator_id)
            attach(daemon.discovery, daemon)
        elif polled is not None and polled != identity.operator_id:
            daemon.discovery.poll_now()

    def fetch(self) -> Deferred[list[ApiEndpoint]]:
        """
        Poll the bound endpoints of this machine's operator.
        """
        daemon = self._daemon
        identity = daemon.identity
        assert identity is not None
        operator_id = self._polled_operator = identity.operator_id

        def failed(failure: Failure) -> Failure:
            # Is the operator gone, or was this 404 about something else?
            error = failure.value
            if isinstance(error, APIError) and error.status == 404:
                daemon.identity_service.check_operator(operator_id)
            return failure

        return daemon.api.bound_endpoints(operator_id).addErrback(failed)

    def _serve_kept(self, operator_id: str) -> None:
        """
        Until the first good poll, serve the endpoints an earlier run kept
        for this operator, marked stale: the API may be down while the
        ingress works.
        """
        kept = self.kept
        if kept is None or kept[0] != operator_id:
            return
        daemon = self._daemon
        daemon.stale = True
        self.log.info(
            "serving the {count} endpoints of the last good poll, kept in"
            " {path}, until the ngrok API answers",
            count=len(kept[1]),
            path=os.path.join(daemon.config.server.state_dir, lastgood.LAST_GOOD),
        )
        daemon.reconcile(kept[1])

    def answered(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        A good poll: serve it (no longer stale), and keep it for a restart
        if it changed, off the reactor thread (it waits for fsync), one
        write at a time.
        """
        daemon = self._daemon
        daemon.stale = False
        operator_id = self._polled_operator
        if operator_id is not None and self.kept != (operator_id, found):
            self.kept = (operator_id, found)
            self._keeping.run(
                deferToThreadPool,
                self._reactor,
                self._reactor.getThreadPool(),
                lastgood.save,
                daemon.config.server.state_dir,
                operator_id,
                found,
            ).addCallbacks(self._kept_saved, self._keep_failed)
        return daemon.reconcile(found)

    def _kept_saved(self, _: object) -> None:
        self._daemon.problems.cleared(_KEEPING)

    def _keep_failed(self, failure: Failure) -> None:
        failure.trap(AtomicWriteError)
        self.kept = None
        self._daemon.problems.failed(
            _KEEPING,
            str(failure.value),
            "a restart while the ngrok API is down will serve nothing until it answers",
        )
