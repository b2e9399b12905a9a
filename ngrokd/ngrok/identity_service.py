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
and written through C{in_thread}, off the reactor thread.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ngrokd.blocking import InThread
from ngrokd.ngrok.api import (
    EXPECTED_FAILURES,
    APIError,
    APIUnavailable,
    Operator,
    failure_kind,
)
from ngrokd.ngrok.identity import (
    Identity,
    IdentityError,
    IdentityStore,
    IdentityUnreadable,
    OperatorAPI,
    RepairNeeded,
    needs_renewal,
    register,
    renew,
    repair,
)
from ngrokd.retry import MAX_BACKOFF, backoff_delay

#: States, as L{IdentityStatus.state} and C{ngrokctl status} show them.
WAITING_FOR_KEY = "not registered, waiting for an API key"
REGISTERING = "registering"
NOT_REGISTERED = "not registered"
REGISTERED = "registered"
EXPIRED = "certificate expired"
OPERATOR_DELETED = "operator deleted"

#: Seconds between two looks at the certificate's expiry.
CHECK_INTERVAL = 3600.0
#: The first retry after a failure, in seconds; later ones back off.
FIRST_RETRY = 2.0


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


@frozen
class IdentityStatus:
    """
    Who this machine is to ngrok, for C{ngrokctl status} and health checks.
    C{error} is the current problem, C{""} when there is none; it never holds
    the API key.
    """

    state: str
    operator_id: str
    not_after: datetime.datetime | None
    error: str

    @property
    def registered(self) -> bool:
        return self.operator_id != ""


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
        self._config_path = config_path
        self._ingress_endpoint = ingress_endpoint
        self._renew_before = renew_before
        self._reregister = reregister_if_deleted
        self._check_interval = check_interval
        self._jitter = jitter
        self.identity: Identity | None = None
        self.state = NOT_REGISTERED
        self.error = ""
        self._logged: tuple[str, str] = ("", "")
        self._failures = 0
        #: Whether the last failure was the API being down or overloaded.
        self._api_was_down = False
        #: ngrok's selectors for our operator, once known.
        self._ngrok_selectors: tuple[str, ...] | None = None
        self._reported_ingress: str | None = None
        self._lock = DeferredLock()
        self._queued = False
        self._current: Deferred[float | None] | None = None
        self._timer: IDelayedCall | None = None

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
        error = failure.value
        self._api_was_down = isinstance(error, APIUnavailable) or (
            isinstance(error, APIError) and (error.status >= 500 or error.status == 429)
        )
        delay = backoff_delay(self._failures, FIRST_RETRY, MAX_BACKOFF, self._jitter)
        if failure.check(IdentityUnreadable):
            problem = "cannot use the stored identity: {reason}"
        elif self.identity is None:
            problem = "cannot register with ngrok: {reason}"
        else:
            problem = "cannot update the identity with ngrok: {reason}"
        expected = failure.check(*EXPECTED_FAILURES, IdentityError, OSError)
        self._report(
            NOT_REGISTERED if self.identity is None else self._registered_state(),
            failure_kind(failure.value),
            problem,
            retry_in=delay,
            unexpected=None if expected else failure,
            reason=failure.getErrorMessage(),
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
                self._wait_for_key(loaded)
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
                self._check_ingress(operator.ingress_endpoint)
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
                before = self.state, self.error
                self._set_state(REGISTERING)
                try:
                    await self._make_identity(api, loaded)
                except BaseException:
                    self.state, self.error = before
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
        self._report(
            OPERATOR_DELETED,
            "deleted",
            "operator {id} no longer exists in the ngrok account of the API key"
            " (was it deleted in the dashboard?): its endpoints can no longer be"
            " discovered (those found before are still served, as they were)."
            " To register this machine again, set api.reregister_if_deleted:"
            " true in {config}, or delete {operator_id_path} and restart ngrokd",
            id=operator_id,
            config=self._config_path,
            operator_id_path=self._store.operator_id_path,
        )
        return None

    # State

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def _expired(self) -> bool:
        return self.identity is not None and self.identity.expired(self._now())

    def _margin(self, identity: Identity) -> datetime.timedelta:
        """
        The configured margin, but at most half the certificate's life, so
        that a short-lived certificate is not renewed again and again.
        """
        return min(self._renew_before, (identity.not_after - identity.not_before) / 2)

    def _due(self) -> bool:
        identity = self.identity
        assert identity is not None
        return needs_renewal(identity, self._now(), self._margin(identity))

    def _until_next_check(self) -> float:
        identity = self.identity
        assert identity is not None
        due = identity.not_after - self._margin(identity)
        seconds = (due - self._now()).total_seconds()
        if seconds <= 0:
            # Still due after this pass (ngrok issued a certificate already
            # due, or there is no key): look again later, not at once.
            return self._check_interval
        return min(self._check_interval, seconds)

    def _without_key(self) -> float:
        if self._due():
            assert self.identity is not None
            self._report(
                self._registered_state(),
                "renewal without key",
                "the certificate {cert} (valid until {not_after}) is due for"
                " renewal, which needs an API key",
                cert=self._store.cert_path,
                not_after=self.identity.not_after.isoformat(),
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
        self._check_ingress(identity.ingress_endpoint)
        self._settle()

    def _registered_state(self) -> str:
        return EXPIRED if self._expired() else REGISTERED

    def _settle(self) -> None:
        """
        The identity is in use and nothing failed: say whether it is in order.
        """
        identity = self.identity
        assert identity is not None
        if self._expired():
            self._report(
                EXPIRED,
                "expired",
                "the certificate {cert} expired at {not_after}: the binding"
                " ingress refuses it until it is renewed",
                cert=self._store.cert_path,
                not_after=identity.not_after.isoformat(),
            )
        else:
            self._set_state(REGISTERED)

    def _wait_for_key(self, loaded: RepairNeeded | None) -> None:
        remedy = (
            ": set api.key in {config}, NGROK_API_KEY in the environment, or run"
            " ngrokctl set-api-key"
        )
        if isinstance(loaded, RepairNeeded):
            self._report(
                WAITING_FOR_KEY,
                "no key",
                "not registered, waiting for an API key (the stored identity"
                " needs repair: {repair})" + remedy,
                config=self._config_path,
                repair=loaded.reason,
            )
        else:
            self._report(
                WAITING_FOR_KEY,
                "no key",
                "not registered, waiting for an API key" + remedy,
                config=self._config_path,
            )

    def _check_ingress(self, reported: str | None) -> None:
        if not reported or reported == self._reported_ingress:
            return
        self._reported_ingress = reported
        if reported != self._ingress_endpoint:
            self.log.warn(
                "ngrok reports the binding ingress at {reported}, but ingressEndpoint"
                " in {config} is {configured}; connections go to {configured}",
                reported=reported,
                configured=self._ingress_endpoint,
                config=self._config_path,
            )

    def _set_state(self, state: str) -> None:
        """
        Enter C{state} with no problem to report.
        """
        if state == REGISTERED and self._logged[0] in (REGISTERED, EXPIRED):
            self.log.info(
                "operator {id}: the identity is in order again",
                id=self.identity.operator_id if self.identity else "",
            )
        self.state, self.error = state, ""
        if state == REGISTERED:
            self._logged = ("", "")

    def _report(
        self,
        state: str,
        kind: str,
        problem: str,
        retry_in: float | None = None,
        unexpected: Failure | None = None,
        **fields: object,
    ) -> None:
        """
        Enter C{state} with C{problem}, a log format of C{fields} (its text
        is L{error}), and log it unless it is the same C{kind} of problem in
        the same state as last time; an C{unexpected} failure (a fault of
        ngrokd) with its traceback.
        """
        self.state, self.error = state, problem.format(**fields)
        if (state, kind) == self._logged:
            return
        self._logged = (state, kind)
        retrying = problem + "; retrying in {delay:.1f}s"
        if unexpected is not None:
            self.log.failure(
                retrying, unexpected, LogLevel.critical, delay=retry_in, **fields
            )
        elif state == WAITING_FOR_KEY:
            self.log.warn(problem, **fields)
        elif retry_in is None:
            self.log.error(problem, **fields)
        else:
            self.log.error(retrying, delay=retry_in, **fields)
