# -*- test-case-name: ngrokd.test.test_identity_service -*-
"""
Keeping this machine's identity with ngrok whole, current and as configured.

L{IdentityService} runs the functions of L{ngrokd.ngrok.identity} at the right
moments, one at a time:

  - at start it loads the stored identity, or registers (repairing a partial
    one) when there is an API key, or says that it waits for one;
  - with a stored identity it asks ngrok once for the operator, to learn
    whether it still exists and which endpoint selectors it has: a changed
    selector list is sent to ngrok (with a new key's CSR: the one update the
    API client makes);
  - it renews the certificate when it comes within C{renew_before} of its
    end (or past half its life, for certificates shorter than twice that),
    checked at start and then at least every C{check_interval} seconds; a
    renewal that failed because the API was down is retried as soon as any
    call to the API succeeds (L{IdentityService.api_answered}), not after
    its backoff, since connections fail once the certificate expires;
  - when ngrok no longer has the operator (deleted in the dashboard) it says
    so and what to do, or registers afresh when told to.

Every new identity goes to C{on_identity} (the daemon gives the certificate
to the ingress connector: connections already open keep theirs, new ones
use the new one). A failure never stops the service: it is reported (in
L{IdentityService.status} and in the log, once per change of state) and
retried with backoff, while the last good identity stays in use. The API key
is never read here, only whether there is one. The identity files are read
and written through C{in_thread}, off the reactor thread. When to renew is
decided by L{ngrokd.ngrok.renewal}; what is said, by
L{ngrokd.ngrok.identity_report}. The states and L{IdentityStatus} are
importable from here too.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.blocking import InThread
from ngrokd.ngrok.answers import Operator
from ngrokd.ngrok.apierrors import APIError
from ngrokd.ngrok.identity import (
    Identity,
    IdentityStore,
    OperatorAPI,
    RepairNeeded,
    register,
    renew,
    repair,
)
from ngrokd.ngrok.identity_report import IdentityReport
from ngrokd.ngrok.renewal import CHECK_INTERVAL as CHECK_INTERVAL
from ngrokd.ngrok.renewal import EXPIRED as EXPIRED
from ngrokd.ngrok.renewal import (
    FIRST_RETRY,
    REGISTERING,
    api_was_down,
    next_check,
    registered_state,
    renewal_due,
)
from ngrokd.ngrok.renewal import NOT_REGISTERED as NOT_REGISTERED
from ngrokd.ngrok.renewal import OPERATOR_DELETED as OPERATOR_DELETED
from ngrokd.ngrok.renewal import REGISTERED as REGISTERED
from ngrokd.ngrok.renewal import WAITING_FOR_KEY as WAITING_FOR_KEY
from ngrokd.ngrok.renewal import IdentityStatus as IdentityStatus
from ngrokd.retry import MAX_BACKOFF, backoff_delay


class IdentityAPI(OperatorAPI, Protocol):
    """
    What the service needs of L{ngrokd.ngrok.api.NgrokAPI}.
    """

    def get_operator(self, operator_id: str) -> Deferred[Operator]: ...


class KeyRejected(Exception):
    """
    An API key offered at run time works, but not for this machine's
    operator: it belongs to an account that does not have it.
    """

    def __init__(self, operator_id: str) -> None:
        super().__init__(operator_id)
        self.operator_id = operator_id

    def __str__(self) -> str:
        return (
            f"the ngrok account of this API key has no operator {self.operator_id},"
            " the one this machine is registered as; use a key of that account"
        )


class NotRegistered(Exception):
    """
    There is no identity to act on yet; C{state} says why.
    """

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state

    def __str__(self) -> str:
        return f"this machine is not registered with ngrok: {self.state}"


class IdentityService(Service):
    """
    Makes and keeps this machine's identity; see the module docstring.

    @param in_thread: reads and writes the identity files (they wait for
        C{fsync}) off the reactor thread.
    @param has_key: whether there is an API key now (the API client reads
        the key itself, at each request).
    @param on_identity: called with every identity put into use.
    @param config_path: named in messages that say what to change.
    @param ingress_endpoint: the configured C{ingressEndpoint}, compared
        with the one ngrok reports.
    """

    log = Logger()

    def __init__(
        self,
        store: IdentityStore,
        api: IdentityAPI,
        clock: IReactorTime,
        *,
        in_thread: InThread,
        selectors: Sequence[str],
        hostname: str,
        has_key: Callable[[], bool],
        on_identity: Callable[[Identity], object],
        config_path: str,
        ingress_endpoint: str,
        renew_before: datetime.timedelta = datetime.timedelta(days=30),
        reregister_if_deleted: bool = False,
        check_interval: float = CHECK_INTERVAL,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._api = api
        self._clock = clock
        self._in_thread = in_thread
        self._selectors = tuple(selectors)
        self._hostname = hostname
        self._has_key = has_key
        self._on_identity = on_identity
        self._said = IdentityReport(self.log, config_path, ingress_endpoint)
        self._renew_before = renew_before
        self._reregister = reregister_if_deleted
        self._check_interval = check_interval
        self._jitter = jitter
        self.identity: Identity | None = None
        self._failures = 0
        #: Whether the last failure was the API being down or overloaded.
        self._api_was_down = False
        #: ngrok's selectors for our operator, once known.
        self._ngrok_selectors: tuple[str, ...] | None = None
        self._lock = DeferredLock()
        self._queued = False
        self._current: Deferred[float | None] | None = None
        self._timer: IDelayedCall | None = None

    @property
    def state(self) -> str:
        """
        The identity's state (L{ngrokd.ngrok.renewal}'s states).
        """
        return self._said.state

    @state.setter
    def state(self, state: str) -> None:
        self._said.state = state

    @property
    def error(self) -> str:
        """
        The current problem, C{""} when there is none.
        """
        return self._said.error

    # Lifecycle and controls

    def startService(self) -> None:
        Service.startService(self)
        self._kick()

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        self._cancel_timer()
        if self._current is not None:
            self._current.cancel()
        return None

    def status(self) -> IdentityStatus:
        identity = self.identity
        return IdentityStatus(
            state=self.state,
            operator_id=identity.operator_id if identity else "",
            not_after=identity.not_after if identity else None,
            error=self.error,
        )

    def key_changed(self) -> None:
        """
        The API key was set or changed: act on it now (register, verify,
        renew) instead of at the next retry.
        """
        if self.running:
            self._kick()

    def use_api(self, api: IdentityAPI) -> None:
        """
        Talk to ngrok through C{api} from now on (the API's address, trust
        or timeout changed).
        """
        self._api = api

    def reconfigure(
        self,
        selectors: Sequence[str],
        renew_before: datetime.timedelta,
        reregister_if_deleted: bool,
    ) -> None:
        """
        Use changed settings: new selectors are sent to ngrok, a new margin
        may make renewal due, and re-registering may now be allowed.
        """
        self._selectors = tuple(selectors)
        self._renew_before = renew_before
        self._reregister = reregister_if_deleted
        if self.running:
            self._kick()

    def check_operator(self, operator_id: str) -> None:
        """
        ngrok answered 404 for something of C{operator_id} (a poll of its
        bound endpoints): ask ngrok whether the operator still exists, and
        act on the answer.
        """
        identity = self.identity
        if (
            identity is not None
            and identity.operator_id == operator_id
            and self.state != OPERATOR_DELETED
            and self.running
        ):
            self._ngrok_selectors = None
            self._kick()

    def api_answered(self) -> None:
        """
        A call to ngrok's API succeeded. If the last pass failed because the
        API was down and the certificate is due for renewal, run a pass now
        rather than after its backoff.
        """
        if (
            self.running
            and self._api_was_down
            and not self._lock.locked
            and not self._queued
            and self.identity is not None
            and self.state != OPERATOR_DELETED
            and self._has_key()
            and self._due()
        ):
            self.log.info("the ngrok API answers again; renewing the certificate now")
            self._kick()

    def renew_now(self) -> Deferred[Identity]:
        """
        Renew the certificate now, whatever its expiry; fires with the new
        identity, or fails with the reason (the old one stays in use), or
        with L{NotRegistered}.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._renew_now()))

    def try_api(self, api: IdentityAPI) -> Deferred[None]:
        """
        Prove that C{api} (the client with a candidate API key) works for
        this machine, changing nothing before it does: register with it when
        not registered, otherwise check that its account has our operator.

        @raise KeyRejected: (in the Deferred) the key's account does not
            have our operator.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._try_api(api)))

    # Passes: one at a time, under the lock

    def _kick(self) -> None:
        """
        Run a pass now, or right after the one under way.
        """
        self._cancel_timer()
        if self._queued:
            return
        self._queued = True
        self._lock.run(self._run_pass)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(delay, self._kick)

    def _run_pass(self) -> Deferred[None]:
        self._queued = False
        if not self.running:
            return succeed(None)
        current = self._current = Deferred.fromCoroutine(self._pass())
        return current.addCallbacks(self._pass_done, self._pass_failed)

    def _pass_done(self, delay: float | None) -> None:
        self._current = None
        self._failures = 0
        self._api_was_down = False
        if delay is not None and self.running:
            self._schedule(delay)

    def _pass_failed(self, failure: Failure) -> None:
        self._current = None
        if not self.running:
            return  # cancelled by stopService
        self._failures += 1
        self._api_was_down = api_was_down(failure.value)
        delay = backoff_delay(self._failures, FIRST_RETRY, MAX_BACKOFF, self._jitter)
        self._said.failed(
            failure,
            NOT_REGISTERED if self.identity is None else self._registered_state(),
            registered=self.identity is not None,
            retry_in=delay,
        )
        self._schedule(delay)

    async def _pass(self) -> float | None:
        """
        Make the identity whole, current and as configured; how many
        seconds until the next pass (C{None}: only when kicked).
        """
        if self.identity is None:
            loaded = await self._in_thread(self._store.load)
            if isinstance(loaded, Identity):
                self._adopt(loaded)
            elif not self._has_key():
                self._said.waiting_for_key(loaded)
                return None
            else:
                self._set_state(REGISTERING)
                await self._make_identity(self._api, loaded)
        if self.state == OPERATOR_DELETED:
            if not (self._reregister and self._has_key()):
                return None
            assert self.identity is not None
            return await self._operator_gone(self.identity.operator_id)
        if not self._has_key():
            return self._without_key()
        return await self._keep_current(self._api)

    async def _make_identity(
        self, api: IdentityAPI, loaded: RepairNeeded | None
    ) -> None:
        # A wrong key fails here, before a key file is written.
        await api.operators()
        if isinstance(loaded, RepairNeeded):
            identity = await repair(
                api,
                self._store,
                loaded,
                self._selectors,
                self._hostname,
                self._in_thread,
            )
        else:
            identity = await register(
                api, self._store, self._selectors, self._hostname, self._in_thread
            )
        self._ngrok_selectors = self._selectors
        self._adopt(identity)

    async def _keep_current(self, api: IdentityAPI) -> float | None:
        assert self.identity is not None
        operator_id = self.identity.operator_id
        try:
            if self._ngrok_selectors is None:
                operator = await api.get_operator(operator_id)
                self._ngrok_selectors = operator.selectors
                self._said.ingress(operator.ingress_endpoint)
            if self._ngrok_selectors != self._selectors:
                self.log.info(
                    "updating the endpoint selectors of operator {id} from"
                    " {old} to {new}",
                    id=operator_id,
                    old=list(self._ngrok_selectors),
                    new=list(self._selectors),
                )
                await self._renew(api)
            elif self._due():
                await self._renew(api)
        except APIError as e:
            if e.status != 404:
                raise
            return await self._operator_gone(operator_id)
        self._settle()
        return self._until_next_check()

    async def _renew(self, api: IdentityAPI) -> Identity:
        assert self.identity is not None
        identity = await renew(
            api, self._store, self.identity, self._selectors, self._in_thread
        )
        self._ngrok_selectors = self._selectors
        self._adopt(identity)
        return identity

    async def _renew_now(self) -> Identity:
        if self.identity is None:
            raise NotRegistered(self.state)
        return await self._renew(self._api)

    async def _try_api(self, api: IdentityAPI) -> None:
        if self.identity is None:
            loaded = await self._in_thread(self._store.load)
            if isinstance(loaded, Identity):
                self._adopt(loaded)
            else:
                before = self._said.state, self._said.error
                self._set_state(REGISTERING)
                try:
                    await self._make_identity(api, loaded)
                except BaseException:
                    self._said.state, self._said.error = before
                    raise
                return
        assert self.identity is not None
        if self.state == OPERATOR_DELETED:
            await api.operators()
            return
        try:
            operator = await api.get_operator(self.identity.operator_id)
        except APIError as e:
            if e.status == 404:
                raise KeyRejected(self.identity.operator_id) from None
            raise
        self._ngrok_selectors = operator.selectors

    async def _operator_gone(self, operator_id: str) -> float | None:
        if self._reregister:
            self.log.warn(
                "operator {id} no longer exists at ngrok; registering this"
                " machine again, as api.reregister_if_deleted is true",
                id=operator_id,
            )
            self._set_state(REGISTERING)
            await self._make_identity(self._api, None)
            return self._until_next_check()
        self._said.operator_deleted(operator_id, self._store.operator_id_path)
        return None

    # State

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def _due(self) -> bool:
        identity = self.identity
        assert identity is not None
        return renewal_due(identity, self._now(), self._renew_before)

    def _until_next_check(self) -> float:
        identity = self.identity
        assert identity is not None
        return next_check(
            identity, self._now(), self._renew_before, self._check_interval
        )

    def _without_key(self) -> float:
        if self._due():
            assert self.identity is not None
            self._said.due_without_key(
                self._registered_state(),
                self._store.cert_path,
                self.identity.not_after,
            )
        else:
            self._settle()
        return self._until_next_check()

    def _adopt(self, identity: Identity) -> None:
        fresh = self.identity is None
        self.identity = identity
        self._on_identity(identity)
        if fresh:
            self.log.info(
                "this machine is operator {id} at ngrok; certificate valid until"
                " {not_after}",
                id=identity.operator_id,
                not_after=identity.not_after.isoformat(),
            )
        self._said.ingress(identity.ingress_endpoint)
        self._settle()

    def _registered_state(self) -> str:
        assert self.identity is not None
        return registered_state(self.identity, self._now())

    def _settle(self) -> None:
        """
        The identity is in use and nothing failed: say whether it is in order.
        """
        identity = self.identity
        assert identity is not None
        if identity.expired(self._now()):
            self._said.expired(self._store.cert_path, identity.not_after)
        else:
            self._set_state(REGISTERED)

    def _set_state(self, state: str) -> None:
        """
        Enter C{state} with no problem to report.
        """
        self._said.set_state(state, self.identity.operator_id if self.identity else "")
