# -*- test-case-name: ngrokd.test.test_identity_service -*-
"""
When this machine's certificate is renewed, and what state its identity is
in: pure decisions of the identity, the settings and the time, so that
L{ngrokd.ngrok.identity_service} (which does the work) only asks them.
"""

from __future__ import annotations

import datetime

from attrs import frozen

from ngrokd.ngrok.apierrors import APIError, APIUnavailable
from ngrokd.ngrok.identity import Identity, needs_renewal

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


def renewal_margin(
    identity: Identity, renew_before: datetime.timedelta
) -> datetime.timedelta:
    """
    How long before its end the certificate is renewed: C{renew_before},
    but at most half the certificate's life, so that a short-lived
    certificate is not renewed again and again.
    """
    return min(renew_before, (identity.not_after - identity.not_before) / 2)


def renewal_due(
    identity: Identity, now: datetime.datetime, renew_before: datetime.timedelta
) -> bool:
    """
    Whether the certificate is to be renewed at C{now}.
    """
    return needs_renewal(identity, now, renewal_margin(identity, renew_before))


def next_check(
    identity: Identity,
    now: datetime.datetime,
    renew_before: datetime.timedelta,
    check_interval: float,
) -> float:
    """
    Seconds from C{now} until the certificate is looked at again: when it
    comes due, and at least every C{check_interval} seconds.
    """
    due = identity.not_after - renewal_margin(identity, renew_before)
    seconds = (due - now).total_seconds()
    if seconds <= 0:
        # Still due after this pass (ngrok issued a certificate already
        # due, or there is no key): look again later, not at once.
        return check_interval
    return min(check_interval, seconds)


def api_was_down(error: BaseException | None) -> bool:
    """
    Whether C{error} is ngrok's API being down or overloaded: a pass that
    failed so is tried again as soon as the API answers.
    """
    return isinstance(error, APIUnavailable) or (
        isinstance(error, APIError) and (error.status >= 500 or error.status == 429)
    )


def registered_state(identity: Identity, now: datetime.datetime) -> str:
    """
    The state of a registered machine with C{identity} at C{now}.
    """
    return EXPIRED if identity.expired(now) else REGISTERED
