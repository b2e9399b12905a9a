"""
Tests for L{ngrokd.ngrok.identity_service}: registering, waiting for a key,
retrying, renewing on time, following the configured selectors, and a
deleted operator, against the real devcloud API in memory (L{StubTreq}) on a
L{Clock} set to the current time.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from ngrokd.config import ConfigError, parse_config
from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud
from ngrokd.ngrok.api import APIError, HTTPRequester, NgrokAPI
from ngrokd.ngrok.identity import Identity, IdentityStore, generate_key
from ngrokd.ngrok.identity_report import IdentityReport
from ngrokd.ngrok.identity_service import IdentityService, KeyRejected, NotRegistered
from ngrokd.ngrok.renewal import (
    CHECK_INTERVAL,
    EXPIRED,
    NOT_REGISTERED,
    OPERATOR_DELETED,
    REGISTERED,
    WAITING_FOR_KEY,
)
from ngrokd.test.test_discovery import capture_logs
from ngrokd.test.threads import at_once

KEY = "identity-service-test-key-5f3a"
WRONG_KEY = "wrong-key-0c9d1e"
INGRESS = "ingress.test:443"
CONFIG = "/etc/ngrokd/config.yml"


class Requests(Resource):
    """
    Records the method and path of each request to the resource it wraps.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.seen: list[str] = []

    def render(self, request: Any) -> Any:
        path = request.path.decode().split("/")[1:]
        name = "/".join("ID" if part.startswith("k8sop_") else part for part in path)
        self.seen.append(f"{request.method.decode()} {name}")
        return self.wrapped.render(request)


def same(one: object, other: object) -> bool:
    """
    Whether two identities are the same operator, key and certificate (what
    ngrok reported about the ingress aside).
    """
    assert isinstance(one, Identity) and isinstance(other, Identity)
    return (one.operator_id, one.key_pem, one.cert_pem) == (
        other.operator_id,
        other.key_pem,
        other.cert_pem,
    )


class ServiceTestCase(SynchronousTestCase):
    """
    A devcloud account in memory, a state directory, and services made on
    a clock at the current time.
    """

    cert_days = 365.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.cloud = Cloud(
            CertificateAuthority.create("t"), {KEY}, INGRESS, self.cert_days
        )
        self.requests = Requests(api_resource(self.cloud, "https://api.test"))
        self.key = KEY
        self.api = self.make_api(lambda: self.key)
        self.state_dir = self.mktemp()
        self.identities: list[Identity] = []
        self.events = capture_logs(self)

    def make_api(self, key: Any) -> NgrokAPI:
        http = cast(HTTPRequester, StubTreq(self.requests))
        return NgrokAPI("https://api.test", key, http, self.clock)

    def service(self, **options: Any) -> IdentityService:
        settings: dict[str, Any] = {
            "selectors": ["true"],
            "hostname": "host1",
            "has_key": lambda: bool(self.key),
            "on_identity": self.identities.append,
            "config_path": CONFIG,
            "ingress_endpoint": INGRESS,
            "jitter": lambda: 1.0,
        }
        settings.update(options)
        return IdentityService(
            IdentityStore(self.state_dir),
            self.api,
            self.clock,
            in_thread=at_once,
            **settings,
        )

    def start(self, **options: Any) -> IdentityService:
        service = self.service(**options)
        service.startService()
        self.addCleanup(self.stop, service)
        return service

    def stop(self, service: IdentityService) -> None:
        if service.running:
            service.stopService()

    def registered(self, **options: Any) -> IdentityService:
        """
        A started service that registered; the requests it made forgotten.
        """
        service = self.start(**options)
        self.assertEqual(service.state, REGISTERED)
        del self.requests.seen[:]
        return service

    def restart(self, service: IdentityService, **options: Any) -> IdentityService:
        service.stopService()
        del self.requests.seen[:]
        return self.start(**options)

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def logged(self, level: LogLevel | None = None) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if (level is None or e["log_level"] == level)
            and e.get("log_namespace", "").startswith("ngrokd.ngrok.identity")
        ]

    def assertKeyNeverShown(self, *keys: str) -> None:
        shown = [formatEvent(e) for e in self.events]
        for key in keys:
            for text in shown:
                self.assertNotIn(key, text)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class StartTests(ServiceTestCase):
    """
    What the service does at start, with and without a key.
    """

    def test_noKey(self) -> None:
        """
        Without an API key the service waits and says how to give one; it
        asks ngrok nothing and schedules nothing.
        """
        self.key = ""
        service = self.start()
        status = service.status()
        self.assertEqual((status.state, status.registered), (WAITING_FOR_KEY, False))
        self.assertIn("api.key", status.error)
        self.assertIn("NGROK_API_KEY", status.error)
        self.assertEqual(self.requests.seen, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        (warning,) = self.logged(LogLevel.warn)
        self.assertIn("waiting for an API key", warning)

    def test_keyArrives(self) -> None:
        """
        When a key arrives the service registers at once, with the
        configured selectors, and hands the identity over.
        """
        self.key = ""
        service = self.start(selectors=["a == 'b'"])
        self.key = KEY
        service.key_changed()
        self.assertEqual(service.state, REGISTERED)
        (identity,) = self.identities
        self.assertEqual(service.status().operator_id, identity.operator_id)
        self.assertEqual(
            self.cloud.get_operator(identity.operator_id).selectors, ("a == 'b'",)
        )
        self.assertEqual(
            self.requests.seen,
            ["GET kubernetes_operators", "POST kubernetes_operators"],
        )

    def test_restartReuses(self) -> None:
        """
        A restart uses the stored identity: ngrok is asked once whether the
        operator exists, nothing is registered or renewed.
        """
        service = self.registered()
        first = self.identities[-1]
        again = self.restart(service)
        self.assertTrue(same(again.identity, IdentityStore(self.state_dir).load()))
        assert again.identity is not None
        self.assertEqual(again.identity.operator_id, first.operator_id)
        self.assertEqual(self.requests.seen, ["GET kubernetes_operators/ID"])
        self.assertEqual(len(self.cloud.operators()), 1)

    def test_storedIdentityWithoutKey(self) -> None:
        """
        A stored identity is used without a key (the ingress needs none).
        """
        service = self.registered()
        self.key = ""
        again = self.restart(service)
        self.assertEqual(again.state, REGISTERED)
        self.assertEqual(self.requests.seen, [])
        self.assertEqual(len(self.identities), 2)

    def test_missingIdRepaired(self) -> None:
        """
        A certificate without its operator id is repaired to the same
        operator, not registered anew and not stored empty.
        """
        service = self.registered()
        operator_id = service.status().operator_id
        service.stopService()
        os.unlink(self.path("operator_id"))
        again = self.start()
        self.assertEqual(again.status().operator_id, operator_id)
        with open(self.path("operator_id")) as f:
            self.assertEqual(f.read(), operator_id)
        self.assertEqual(len(self.cloud.operators()), 1)

    def test_repairWaitsForKey(self) -> None:
        """
        A certificate that is not the key's is reported, naming the files;
        without a key the service waits for one.
        """
        service = self.registered()
        service.stopService()
        with open(self.path("tls.key"), "wb") as f:
            f.write(generate_key())
        self.key = ""
        again = self.start()
        self.assertEqual(again.state, WAITING_FOR_KEY)
        self.assertIn(
            f"{self.path('tls.crt')} is not the certificate of {self.path('tls.key')}",
            again.error,
        )

    def test_unreadable(self) -> None:
        """
        An identity file that cannot be read is reported and never replaced:
        the service retries reading it, and uses it once it can.
        """
        service = self.registered()
        service.stopService()
        os.rename(self.path("tls.crt"), self.path("saved.crt"))
        os.mkdir(self.path("tls.crt"))
        again = self.start()
        self.assertEqual(again.state, NOT_REGISTERED)
        self.assertIn(f"cannot read {self.path('tls.crt')}", again.error)
        self.assertEqual(self.requests.seen, [])
        os.rmdir(self.path("tls.crt"))
        os.rename(self.path("saved.crt"), self.path("tls.crt"))
        self.advance(2)
        self.assertEqual(again.state, REGISTERED)
        self.assertEqual(len(self.cloud.operators()), 1)


class FailureTests(ServiceTestCase):
    """
    Failures are reported once, retried with backoff, and never stop the
    service.
    """

    def test_wrongKey(self) -> None:
        """
        A wrong key is reported (not quoted) and retried with backoff, with
        one log line for the whole run of failures; no key file is written
        for it. When ngrok accepts the key, the next retry registers.
        """
        self.key = WRONG_KEY
        service = self.start()
        self.assertEqual(service.state, NOT_REGISTERED)
        self.assertIn("ERR_NGROK_202", service.error)
        self.assertIn("the API key is not valid", service.error)
        self.assertFalse(os.path.exists(self.path("tls.key")))
        waits = []
        for _ in range(4):
            (call,) = self.clock.getDelayedCalls()
            waits.append(call.getTime() - self.clock.seconds())
            self.advance(waits[-1])
        self.assertEqual(waits, [2, 4, 8, 16])
        self.assertEqual(len(self.logged(LogLevel.error)), 1)
        self.cloud.api_keys.add(WRONG_KEY)
        self.advance(32)
        self.assertEqual(service.state, REGISTERED)
        self.assertEqual(service.error, "")
        self.assertKeyNeverShown(WRONG_KEY, KEY)

    def test_noBindingsFeature(self) -> None:
        """
        An account without Kubernetes bindings is named as such.
        """
        self.cloud.bindings_enabled = False
        service = self.start()
        self.assertIn("ERR_NGROK_19002", service.error)
        self.assertIn("Kubernetes Operators and Bindings feature", service.error)
        self.assertEqual(service.state, NOT_REGISTERED)

    def test_apiDown(self) -> None:
        """
        An API that answers 503 is retried; the identity arrives when it
        recovers.
        """
        self.cloud.faults.next_status(503, count=3)
        service = self.start()
        self.assertEqual(service.state, NOT_REGISTERED)
        self.clock.pump([2, 4, 8])
        self.assertEqual(service.state, REGISTERED)
        self.assertEqual(len(self.logged(LogLevel.error)), 1)

    def test_unexpectedFailureOnceWithTraceback(self) -> None:
        """
        A failure that is not the API's (a fault of ngrokd) is logged once
        with its traceback, however often the retries meet it, and retried.
        """
        calls: list[int] = []

        def broken() -> Deferred[Any]:
            calls.append(1)
            return fail(ZeroDivisionError("broken"))

        self.api.operators = broken  # type: ignore[method-assign]
        service = self.start()
        self.clock.pump([2, 4, 8, 16])
        self.assertEqual(len(calls), 5)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(service.state, NOT_REGISTERED)
        self.assertIn("cannot register with ngrok: broken", service.error)

    def test_deletedStillServing(self) -> None:
        """
        The report of a deleted operator does not say its endpoints cannot
        be reached: those found before are still served.
        """
        service = self.registered()
        operator_id = service.status().operator_id
        self.cloud.delete_operator(operator_id)
        service.check_operator(operator_id)
        self.assertNotIn("reached", service.error)
        self.assertIn("those found before are still served", service.error)

    def test_stop(self) -> None:
        """
        Stopping cancels the pending retry.
        """
        self.key = WRONG_KEY
        service = self.start()
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RenewalTests(ServiceTestCase):
    """
    The certificate is renewed before it expires, and the new one handed over.
    """

    cert_days = 10.0

    def test_renewedBeforeExpiry(self) -> None:
        """
        A certificate is renewed once within the margin of its end (here
        half its life, as it is shorter than twice the margin); until then
        the checks ask ngrok nothing.
        """
        service = self.registered()
        first = service.identity
        assert first is not None
        self.clock.pump([CHECK_INTERVAL] * (24 * 5 - 2))
        self.assertEqual(self.requests.seen, [])
        self.assertIs(service.identity, first)
        self.clock.pump([CHECK_INTERVAL] * 2)
        self.assertEqual(self.requests.seen, ["PATCH kubernetes_operators/ID"])
        renewed = self.identities[-1]
        self.assertEqual(service.identity, renewed)
        self.assertNotEqual(renewed.key_pem, first.key_pem)
        self.assertNotEqual(renewed.cert_pem, first.cert_pem)
        self.assertTrue(same(IdentityStore(self.state_dir).load(), renewed))
        self.assertEqual(len(self.cloud.get_operator(first.operator_id).serials), 2)

    def test_marginConfigured(self) -> None:
        """
        With a margin shorter than half the life, renewal waits for it.
        """
        service = self.registered(renew_before=datetime.timedelta(days=1))
        self.clock.pump([CHECK_INTERVAL] * (24 * 9 - 2))
        self.assertEqual(self.requests.seen, [])
        # The certificate's times are whole seconds of the wall clock when
        # it was issued: its renewal falls due at the check at 9 days or the
        # one after.
        for _ in range(3):
            if self.requests.seen:
                break
            self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.requests.seen, ["PATCH kubernetes_operators/ID"])
        self.assertEqual(service.state, REGISTERED)

    def test_failedRenewalRetried(self) -> None:
        """
        A failed renewal keeps the old identity in use, is reported once, and
        is retried until it succeeds.
        """
        service = self.registered()
        first = service.identity
        self.cloud.faults.next_status(503, count=2)
        for _ in range(24 * 5 + 10):
            if self.requests.seen:
                break
            self.advance(CHECK_INTERVAL)
        self.assertEqual(self.requests.seen, ["PATCH kubernetes_operators/ID"])
        self.assertIs(service.identity, first)
        self.assertEqual(service.state, REGISTERED)
        self.assertIn("cannot update the identity with ngrok", service.error)
        self.clock.pump([2, 4])
        self.assertEqual(len(self.requests.seen), 3)
        self.assertFalse(same(service.identity, first))
        self.assertEqual(service.error, "")
        self.assertEqual(len(self.logged(LogLevel.error)), 1)

    def test_renewedWhenTheAPIAnswersAgain(self) -> None:
        """
        A renewal that failed while the API was down runs as soon as any
        call to the API succeeds, not after its backoff; a call that fails,
        or a certificate not yet due, starts nothing.
        """
        answered: list[IdentityService] = []

        def on_answer() -> None:
            for listener in answered:
                listener.api_answered()

        self.api = NgrokAPI(
            "https://api.test",
            lambda: self.key,
            cast(HTTPRequester, StubTreq(self.requests)),
            self.clock,
            on_answer=on_answer,
        )
        service = self.registered()
        answered.append(service)
        operator_id = service.status().operator_id
        self.successResultOf(self.api.get_operator(operator_id))
        self.assertEqual(self.requests.seen, ["GET kubernetes_operators/ID"])
        first = service.identity
        self.cloud.faults.next_status(503, count=4)
        while "PATCH kubernetes_operators/ID" not in self.requests.seen:
            self.advance(CHECK_INTERVAL)
        self.clock.pump([2, 4])
        self.assertIs(service.identity, first)
        self.assertIn("cannot update the identity with ngrok", service.error)
        del self.requests.seen[:]
        self.failureResultOf(self.api.get_operator(operator_id), APIError)
        self.assertEqual(self.requests.seen, ["GET kubernetes_operators/ID"])
        self.successResultOf(self.api.get_operator(operator_id))
        self.assertEqual(
            self.requests.seen,
            [
                "GET kubernetes_operators/ID",
                "GET kubernetes_operators/ID",
                "PATCH kubernetes_operators/ID",
            ],
        )
        self.assertFalse(same(service.identity, first))
        self.assertEqual(service.error, "")

    def test_expired(self) -> None:
        """
        An expired certificate is reported with its date; without a key it
        stays so, with one it is renewed at once.
        """
        self.cloud.cert_days = 2 / 86400
        service = self.registered()
        service.stopService()
        self.advance(30)
        self.cloud.cert_days = 10
        self.key = ""
        again = self.start()
        self.assertEqual(again.state, EXPIRED)
        self.assertIn("due for renewal, which needs an API key", again.error)
        self.assertTrue(
            any("expired at" in line for line in self.logged(LogLevel.error))
        )
        self.key = KEY
        again.key_changed()
        self.assertEqual(again.state, REGISTERED)
        assert again.identity is not None
        self.assertFalse(again.identity.expired(datetime.datetime.now(datetime.UTC)))

    def test_renewNow(self) -> None:
        """
        C{renew_now} renews whatever the expiry and fires with the identity.
        """
        service = self.registered()
        renewed = self.successResultOf(service.renew_now())
        self.assertEqual(self.identities[-1], renewed)

    def test_renewNowUnregistered(self) -> None:
        """
        Without an identity there is nothing to renew, and ngrok is not asked.
        """
        self.key = ""
        service = self.start()
        self.failureResultOf(service.renew_now(), NotRegistered)
        self.assertEqual(self.requests.seen, [])


class SelectorTests(ServiceTestCase):
    """
    The selectors in the configuration are the ones ngrok has.
    """

    def test_changedAtStart(self) -> None:
        """
        Selectors changed in the configuration are sent to ngrok at start.
        """
        service = self.registered()
        again = self.restart(service, selectors=["x == 1"])
        self.assertEqual(
            self.requests.seen,
            ["GET kubernetes_operators/ID", "PATCH kubernetes_operators/ID"],
        )
        operator = self.cloud.get_operator(again.status().operator_id)
        self.assertEqual(operator.selectors, ("x == 1",))

    def test_changedAtRunTime(self) -> None:
        """
        Selectors changed while running (a reload) are sent at once.
        """
        service = self.registered()
        service.reconfigure(["y == 2"], datetime.timedelta(days=30), False)
        self.assertEqual(self.requests.seen, ["PATCH kubernetes_operators/ID"])
        operator = self.cloud.get_operator(service.status().operator_id)
        self.assertEqual(operator.selectors, ("y == 2",))

    def test_ingressReported(self) -> None:
        """
        An ingress reported by ngrok other than the configured one is
        warned about, once.
        """
        service = self.start(ingress_endpoint="elsewhere.test:443")
        self.restart(service, ingress_endpoint="elsewhere.test:443")
        warnings = [w for w in self.logged(LogLevel.warn) if INGRESS in w]
        self.assertEqual(len(warnings), 2)
        self.assertIn("elsewhere.test:443", warnings[0])


class DeletedOperatorTests(ServiceTestCase):
    """
    An operator deleted at ngrok is said so, with what to do, or replaced.
    """

    def test_deleted(self) -> None:
        """
        A 404 while polling is checked with ngrok; if the operator is gone,
        the service says so and what to do, once, and registers nothing.
        """
        service = self.registered()
        operator_id = service.status().operator_id
        self.cloud.delete_operator(operator_id)
        service.check_operator(operator_id)
        service.check_operator(operator_id)
        self.assertEqual(service.state, OPERATOR_DELETED)
        self.assertIn("deleted in the dashboard", service.error)
        self.assertIn("api.reregister_if_deleted: true", service.error)
        self.assertIn(self.path("operator_id"), service.error)
        self.assertEqual(self.requests.seen, ["GET kubernetes_operators/ID"])
        self.assertEqual(len(self.logged(LogLevel.error)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deletedAtStart(self) -> None:
        """
        An operator deleted while the daemon was down is found at start.
        """
        service = self.registered()
        self.cloud.delete_operator(service.status().operator_id)
        again = self.restart(service)
        self.assertEqual(again.state, OPERATOR_DELETED)

    def test_reregister(self) -> None:
        """
        With C{reregister_if_deleted}, a new operator replaces the deleted
        one, with a new key, and is handed over.
        """
        service = self.registered(reregister_if_deleted=True)
        old = service.identity
        assert old is not None
        self.cloud.delete_operator(old.operator_id)
        service.check_operator(old.operator_id)
        self.assertEqual(service.state, REGISTERED)
        new = self.identities[-1]
        self.assertNotEqual(new.operator_id, old.operator_id)
        self.assertNotEqual(new.key_pem, old.key_pem)
        self.assertTrue(same(IdentityStore(self.state_dir).load(), new))
        self.assertEqual([o.id for o in self.cloud.operators()], [new.operator_id])

    def test_reregisterEnabledLater(self) -> None:
        """
        Allowing re-registration in the configuration later acts on it.
        """
        service = self.registered()
        operator_id = service.status().operator_id
        self.cloud.delete_operator(operator_id)
        service.check_operator(operator_id)
        service.reconfigure(["true"], datetime.timedelta(days=30), True)
        self.assertEqual(service.state, REGISTERED)
        self.assertNotEqual(service.status().operator_id, operator_id)

    def test_other404(self) -> None:
        """
        A 404 that was not about the operator (it still exists) changes
        nothing and is not reported as a deletion.
        """
        service = self.registered()
        service.check_operator(service.status().operator_id)
        self.assertEqual((service.state, service.error), (REGISTERED, ""))
        self.assertEqual(self.logged(LogLevel.error), [])


class TryKeyTests(ServiceTestCase):
    """
    A key offered at run time is tried before anything is kept.
    """

    def test_registersWithKey(self) -> None:
        """
        Not registered, the offered key registers this machine.
        """
        self.key = ""
        service = self.start()
        self.successResultOf(service.try_api(self.make_api(lambda: KEY)))
        self.assertEqual(service.state, REGISTERED)
        self.assertEqual(len(self.cloud.operators()), 1)

    def test_wrongKeyChangesNothing(self) -> None:
        """
        A wrong key fails without writing anything or quoting the key.
        """
        self.key = ""
        service = self.start()
        failure = self.failureResultOf(
            service.try_api(self.make_api(lambda: WRONG_KEY)), APIError
        )
        self.assertNotIn(WRONG_KEY, str(failure.value))
        self.assertEqual(service.state, WAITING_FOR_KEY)
        self.assertIn("api.key", service.error)
        self.assertFalse(os.path.exists(self.state_dir))
        self.assertKeyNeverShown(WRONG_KEY)

    def test_otherAccount(self) -> None:
        """
        Registered, a key of an account without our operator is refused.
        """
        service = self.registered()
        other = Cloud(CertificateAuthority.create("o"), {"other-key"}, INGRESS)
        http = cast(HTTPRequester, StubTreq(api_resource(other, "https://api.test")))
        api = NgrokAPI("https://api.test", lambda: "other-key", http, self.clock)
        failure = self.failureResultOf(service.try_api(api), KeyRejected)
        self.assertIn(service.status().operator_id, str(failure.value))

    def test_sameAccount(self) -> None:
        """
        Registered, a key of the same account is accepted.
        """
        service = self.registered()
        self.cloud.api_keys.add("second-key")
        result: Deferred[None] = service.try_api(self.make_api(lambda: "second-key"))
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(self.requests.seen, ["GET kubernetes_operators/ID"])


class ConfigTests(SynchronousTestCase):
    """
    The settings the service reads from the configuration file.
    """

    def test_defaults(self) -> None:
        """
        Renewal 30 days before the end, no re-registration, 30 s requests.
        """
        config = parse_config("", CONFIG, {}, "linux").config
        self.assertEqual(config.server.renew_before_days, 30.0)
        self.assertFalse(config.api.reregister_if_deleted)
        self.assertEqual(config.api.timeout, 30.0)

    def test_values(self) -> None:
        """
        The keys are read as written.
        """
        config = parse_config(
            "api:\n  reregister_if_deleted: true\n  timeout: 2.5\n"
            "server:\n  renew_before_days: 0.5\n",
            CONFIG,
            {},
            "linux",
        ).config
        self.assertEqual(
            (
                config.api.reregister_if_deleted,
                config.api.timeout,
                config.server.renew_before_days,
            ),
            (True, 2.5, 0.5),
        )

    def test_badValues(self) -> None:
        """
        Bad values are refused naming the file, line and key.
        """
        for text, where in [
            ("server:\n  renew_before_days: -1\n", "2: server.renew_before_days"),
            ("api:\n  reregister_if_deleted: 1\n", "2: api.reregister_if_deleted"),
            ("api:\n  timeout: 0\n", "2: api.timeout"),
        ]:
            error = self.assertRaises(
                ConfigError, parse_config, text, CONFIG, {}, "linux"
            )
            self.assertIn(f"{CONFIG}:{where}", str(error))


class IdentityReportTests(SynchronousTestCase):
    """
    What is said of the identity, apart from the service.
    """

    def test_ingressSaidOnce(self) -> None:
        """
        An ingress ngrok reports that is not the configured one is said
        once, however often ngrok reports it.
        """
        logged = capture_logs(self)
        report = IdentityReport(Logger(), "/etc/ngrokd.yml", "ingress.test:443")
        report.ingress("elsewhere.test:443")
        report.ingress("elsewhere.test:443")
        report.ingress("ingress.test:443")
        self.assertEqual(
            [formatEvent(e) for e in logged],
            [
                "ngrok reports the binding ingress at elsewhere.test:443, but"
                " ingressEndpoint in /etc/ngrokd.yml is ingress.test:443;"
                " connections go to ingress.test:443"
            ],
        )
