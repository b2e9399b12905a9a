# -*- test-case-name: ngrokd.test.test_identity_service -*-
"""
The state of this machine's identity with ngrok, its current problem, and
what is said of them: each problem once while it stays the same kind in the
same state, with what to do, and a fault of ngrokd with its traceback.
Apart from L{ngrokd.ngrok.identity_service}, which decides when, so that
the words are in one place.
"""

from __future__ import annotations

import datetime

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ngrokd.ngrok.apierrors import EXPECTED_FAILURES, failure_kind
from ngrokd.ngrok.identity import IdentityError, IdentityUnreadable, RepairNeeded
from ngrokd.ngrok.renewal import (
    EXPIRED,
    NOT_REGISTERED,
    OPERATOR_DELETED,
    REGISTERED,
    WAITING_FOR_KEY,
)


class IdentityReport:
    """
    The identity's C{state} and C{error} (the current problem, C{""} when
    there is none), said in C{log}.

    @param config_path: named in messages that say what to change.
    @param ingress_endpoint: the configured C{ingressEndpoint}, compared
        with the one ngrok reports.
    """

    def __init__(self, log: Logger, config_path: str, ingress_endpoint: str) -> None:
        self._log = log
        self._config_path = config_path
        self._ingress_endpoint = ingress_endpoint
        self.state = NOT_REGISTERED
        self.error = ""
        self._logged: tuple[str, str] = ("", "")
        self._reported_ingress: str | None = None

    def set_state(self, state: str, operator_id: str) -> None:
        """
        Enter C{state} with no problem to report.
        """
        if state == REGISTERED and self._logged[0] in (REGISTERED, EXPIRED):
            self._log.info(
                "operator {id}: the identity is in order again", id=operator_id
            )
        self.state, self.error = state, ""
        if state == REGISTERED:
            self._logged = ("", "")

    def report(
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
        is C{error}), and log it unless it is the same C{kind} of problem in
        the same state as last time; an C{unexpected} failure (a fault of
        ngrokd) with its traceback.
        """
        self.state, self.error = state, problem.format(**fields)
        if (state, kind) == self._logged:
            return
        self._logged = (state, kind)
        retrying = problem + "; retrying in {delay:.1f}s"
        if unexpected is not None:
            self._log.failure(
                retrying, unexpected, LogLevel.critical, delay=retry_in, **fields
            )
        elif state == WAITING_FOR_KEY:
            self._log.warn(problem, **fields)
        elif retry_in is None:
            self._log.error(problem, **fields)
        else:
            self._log.error(retrying, delay=retry_in, **fields)

    def failed(
        self, failure: Failure, state: str, registered: bool, retry_in: float
    ) -> None:
        """
        A pass failed with C{failure}, leaving C{state}; it is tried again
        in C{retry_in} seconds.
        """
        if failure.check(IdentityUnreadable):
            problem = "cannot use the stored identity: {reason}"
        elif not registered:
            problem = "cannot register with ngrok: {reason}"
        else:
            problem = "cannot update the identity with ngrok: {reason}"
        expected = failure.check(*EXPECTED_FAILURES, IdentityError, OSError)
        self.report(
            state,
            failure_kind(failure.value),
            problem,
            retry_in=retry_in,
            unexpected=None if expected else failure,
            reason=failure.getErrorMessage(),
        )

    def waiting_for_key(self, loaded: RepairNeeded | None) -> None:
        """
        Not registered, and no API key to register with.
        """
        remedy = (
            ": set api.key in {config}, NGROK_API_KEY in the environment, or run"
            " ngrokctl set-api-key"
        )
        if isinstance(loaded, RepairNeeded):
            self.report(
                WAITING_FOR_KEY,
                "no key",
                "not registered, waiting for an API key (the stored identity"
                " needs repair: {repair})" + remedy,
                config=self._config_path,
                repair=loaded.reason,
            )
        else:
            self.report(
                WAITING_FOR_KEY,
                "no key",
                "not registered, waiting for an API key" + remedy,
                config=self._config_path,
            )

    def expired(self, cert: str, not_after: datetime.datetime) -> None:
        """
        The certificate C{cert} expired at C{not_after}.
        """
        self.report(
            EXPIRED,
            "expired",
            "the certificate {cert} expired at {not_after}: the binding"
            " ingress refuses it until it is renewed",
            cert=cert,
            not_after=not_after.isoformat(),
        )

    def due_without_key(
        self, state: str, cert: str, not_after: datetime.datetime
    ) -> None:
        """
        The certificate C{cert} is due for renewal, and there is no API key.
        """
        self.report(
            state,
            "renewal without key",
            "the certificate {cert} (valid until {not_after}) is due for"
            " renewal, which needs an API key",
            cert=cert,
            not_after=not_after.isoformat(),
        )

    def operator_deleted(self, operator_id: str, operator_id_path: str) -> None:
        """
        ngrok no longer has the operator C{operator_id}.
        """
        self.report(
            OPERATOR_DELETED,
            "deleted",
            "operator {id} no longer exists in the ngrok account of the API key"
            " (was it deleted in the dashboard?): its endpoints can no longer be"
            " discovered (those found before are still served, as they were)."
            " To register this machine again, set api.reregister_if_deleted:"
            " true in {config}, or delete {operator_id_path} and restart ngrokd",
            id=operator_id,
            config=self._config_path,
            operator_id_path=operator_id_path,
        )

    def ingress(self, reported: str | None) -> None:
        """
        ngrok reports the binding ingress at C{reported}: say so once when
        that is not where connections go.
        """
        if not reported or reported == self._reported_ingress:
            return
        self._reported_ingress = reported
        if reported != self._ingress_endpoint:
            self._log.warn(
                "ngrok reports the binding ingress at {reported}, but ingressEndpoint"
                " in {config} is {configured}; connections go to {configured}",
                reported=reported,
                configured=self._ingress_endpoint,
                config=self._config_path,
            )
