"""
Tests for L{ngrokd.ngrok.discovery}: polling on a clock, backing off, logging once
per change of state, and walking every page of a large listing.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud
from ngrokd.ngrok.api import HTTPRequester, NgrokAPI
from ngrokd.ngrok.apierrors import APIError, APIUnavailable, failure_kind
from ngrokd.ngrok.discovery import EndpointDiscoveryService
from ngrokd.ngrok.identity import generate_key, make_csr
from ngrokd.retry import MAX_BACKOFF, MAX_RETRY_AFTER, backoff_delay

INTERVAL = 30.0


def capture_logs(case: SynchronousTestCase) -> EventLoggingObserver:
    """
    Every event logged during C{case}.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def _unavailable() -> Deferred[Any]:
    return fail(APIUnavailable("https://api.test/x", "connection refused"))


def _server_error(operation: str, retry_after: float | None = None) -> Deferred[Any]:
    status = 503 if retry_after is None else 429
    return fail(APIError(status, None, "busy", operation, retry_after))


class Script:
    """
    A fetch whose answers are scripted: each call takes the next one.
    """

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Deferred[Any]:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else ["ep"]
        if callable(answer):
            result: Deferred[Any] = answer()
            return result
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)


class DiscoveryTestCase(SynchronousTestCase):
    """
    A discovery service on a clock, with its deliveries and logs recorded.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.delivered: list[Any] = []
        self.events = capture_logs(self)

    def start(
        self, fetch: Any, deliver: Any = None, jitter: float = 1.0
    ) -> EndpointDiscoveryService:
        service = EndpointDiscoveryService(
            fetch,
            deliver or self.delivered.append,
            self.clock,
            INTERVAL,
            jitter=lambda: jitter,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(0)
        return service

    def wait(self, service: EndpointDiscoveryService) -> float:
        """
        How long until the next poll.
        """
        assert service.next_poll_at is not None
        return service.next_poll_at - self.clock.seconds()

    def messages(self, level: LogLevel) -> list[str]:
        return [
            e["log_format"]
            for e in self.events
            if e["log_level"] == level
            and e.get("log_namespace", "").endswith("EndpointDiscoveryService")
        ]


class PollingTests(DiscoveryTestCase):
    """
    Polls run every interval and hand over what they found.
    """

    def test_pollsEveryInterval(self) -> None:
        """
        The first poll runs at start, the next ones every interval.
        """
        fetch = Script(["a"], ["b"], ["c"])
        self.start(fetch)
        self.assertEqual(self.delivered, [["a"]])
        self.clock.advance(INTERVAL - 1)
        self.assertEqual(fetch.calls, 1)
        self.clock.advance(1)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.delivered, [["a"], ["b"], ["c"]])

    def test_eachPollObserved(self) -> None:
        """
        C{on_poll} hears how long each poll took and how it failed, if it
        did; a poll cut short by stopping is not a failure it hears of.
        """
        slow: Deferred[Any] = Deferred()
        fetch = Script(lambda: slow, _unavailable, lambda: Deferred())
        heard: list[tuple[float, str]] = []
        service = EndpointDiscoveryService(
            fetch, self.delivered.append, self.clock, INTERVAL, jitter=lambda: 1.0
        )
        service.on_poll = lambda seconds, error: heard.append(
            (seconds, type(error).__name__)
        )
        service.startService()
        self.clock.advance(0)
        self.clock.advance(1.5)
        slow.callback(["a"])
        self.clock.advance(INTERVAL)
        self.clock.advance(self.wait(service))
        service.stopService()
        self.assertEqual(
            (heard, fetch.calls),
            ([(1.5, "NoneType"), (0.0, "APIUnavailable")], 3),
        )

    def test_nextPollWaitsForDelivery(self) -> None:
        """
        While a result is being applied no poll starts; the interval counts
        from the end of the delivery.
        """
        applying: Deferred[None] = Deferred()
        fetch = Script(["a"], ["b"])
        service = self.start(fetch, deliver=lambda found: applying)
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(fetch.calls, 1)
        self.assertIsNone(service.next_poll_at)
        applying.callback(None)
        self.assertEqual(self.wait(service), INTERVAL)

    def test_setInterval(self) -> None:
        """
        A shorter interval cuts a longer wait short (the original built its
        ticker once and ignored a changed interval).
        """
        fetch = Script()
        service = self.start(fetch)
        service.set_interval(5)
        self.assertEqual(self.wait(service), 5)
        self.clock.advance(5)
        self.assertEqual(fetch.calls, 2)
        self.assertEqual(self.wait(service), 5)

    def test_pollNow(self) -> None:
        """
        C{poll_now} polls at once instead of at the end of the interval.
        """
        fetch = Script()
        service = self.start(fetch)
        service.poll_now()
        self.clock.advance(0)
        self.assertEqual(fetch.calls, 2)

    def test_stopCancelsPoll(self) -> None:
        """
        Stopping cancels a poll under way and leaves nothing scheduled or
        logged as a failure.
        """
        cancelled: list[Deferred[Any]] = []
        service = self.start(Script(Deferred(cancelled.append)))
        service.stopService()
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.messages(LogLevel.warn), [])

    def test_deliveryFailureLogged(self) -> None:
        """
        A result that cannot be applied is logged with its traceback, and
        polling goes on at the normal interval.
        """

        def deliver(found: Any) -> None:
            raise ValueError("cannot apply")

        service = self.start(Script(), deliver=deliver)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.wait(service), INTERVAL)


class FailureTests(DiscoveryTestCase):
    """
    A failed poll keeps the last result, backs off, and is logged once.
    """

    def test_failureDeliversNothing(self) -> None:
        """
        A failed poll hands nothing over: what is served stays as it was.
        """
        self.start(Script(["a"], _unavailable))
        self.clock.advance(INTERVAL)
        self.assertEqual(self.delivered, [["a"]])

    def test_backoff(self) -> None:
        """
        Failures in a row wait 2, 4, 8... seconds, up to the cap; the first
        success returns to the interval.
        """
        fetch = Script(*[_unavailable] * 12)
        service = self.start(fetch)
        waits = []
        for _ in range(12):
            waits.append(self.wait(service))
            self.clock.advance(waits[-1])
        self.assertEqual(waits[:5], [2, 4, 8, 16, 32])
        self.assertEqual(waits[-1], MAX_BACKOFF)
        self.assertEqual(self.wait(service), INTERVAL)
        self.assertEqual(service.failures, 0)

    def test_jitter(self) -> None:
        """
        Each wait is between half and all of the exponential delay, so
        clients failing together do not retry in step.
        """
        self.assertEqual(backoff_delay(3, 2.0, 300.0, lambda: 0.0), 4.0)
        self.assertEqual(backoff_delay(3, 2.0, 300.0, lambda: 0.5), 6.0)
        self.assertEqual(backoff_delay(100, 2.0, 300.0, lambda: 0.0), 150.0)
        service = self.start(Script(_unavailable), jitter=0.0)
        self.assertEqual(self.wait(service), 1.0)

    def test_retryAfter(self) -> None:
        """
        A 429's C{Retry-After} is waited at least, even when the backoff
        would be shorter.
        """
        service = self.start(Script(lambda: _server_error("op1", 45)))
        self.assertEqual(self.wait(service), 45)

    def test_retryAfterBounded(self) -> None:
        """
        An absurd C{Retry-After} does not stop discovery for days.
        """
        service = self.start(Script(lambda: _server_error("op1", 86400 * 7)))
        self.assertEqual(self.wait(service), MAX_RETRY_AFTER)

    def test_loggedOncePerChange(self) -> None:
        """
        The same failure at every poll is logged once (ngrok's operation id
        differs at each answer); a different one is logged again, and so is
        the recovery, once.
        """
        fetch = Script(
            lambda: _server_error("op1"),
            lambda: _server_error("op2"),
            lambda: _server_error("op3"),
            _unavailable,
            _unavailable,
            ["ok"],
            ["ok"],
        )
        service = self.start(fetch)
        for _ in range(6):
            self.clock.advance(self.wait(service))
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertEqual(len(self.messages(LogLevel.info)), 1)
        self.assertEqual(service.last_error, "")

    def test_failureKind(self) -> None:
        """
        API errors are told apart by status and code, not by message.
        """
        self.assertEqual(
            failure_kind(APIError(503, None, "a", "op1")),
            failure_kind(APIError(503, None, "b", "op2")),
        )
        self.assertNotEqual(
            failure_kind(APIError(403, "ERR_NGROK_202", "a", None)),
            failure_kind(APIError(403, "ERR_NGROK_201", "a", None)),
        )


class PageWalkTests(SynchronousTestCase):
    """
    A poll follows every page of a large listing.
    """

    def test_tenThousandEndpoints(self) -> None:
        """
        With 10,000 endpoints on pages of 100, one poll delivers all of them,
        each once, after reading exactly 100 pages.
        """
        cloud = Cloud(CertificateAuthority.create("t"), {"key"}, "ingress.test:443")
        for n in range(10_000):
            cloud.add_endpoint(f"tcp://e{n}.walk:{1 + n}", ("127.0.0.1", 1))
        operator = cloud.register(
            "d", "{}", ["bindings"], "global", {}, ["true"], make_csr(generate_key())
        )
        pages = _Counting(api_resource(cloud, "https://api.test"))
        http = cast(HTTPRequester, StubTreq(pages))
        api = NgrokAPI("https://api.test", lambda: "key", http, Clock())
        delivered: list[Any] = []
        clock = Clock()
        service = EndpointDiscoveryService(
            lambda: api.bound_endpoints(operator.id), delivered.append, clock, 30
        )
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(0)
        (found,) = delivered
        self.assertEqual(len({endpoint.id for endpoint in found}), 10_000)
        self.assertEqual(len(found), 10_000)
        self.assertEqual(pages.requests, 100)


class DevcloudPagingTests(SynchronousTestCase):
    """
    The devcloud pages its endpoints as ngrok does, however they change.
    """

    @given(
        st.lists(st.integers(0, 60), min_size=1, max_size=40, unique=True),
        st.integers(1, 7),
        st.lists(st.integers(0, 60), max_size=10),
    )
    def test_everyEndpointOnce(
        self, numbers: list[int], limit: int, removed: list[int]
    ) -> None:
        """
        Following the cursors gives every endpoint once, in descending id
        order, whatever the page size and after endpoints were removed.
        """
        cloud = Cloud(CertificateAuthority.create("t"), {"key"}, "ingress.test:443")
        for n in numbers:
            cloud.add_endpoint(f"tcp://e{n}.page:{n + 1}", ("127.0.0.1", 1))
        cloud.page_endpoints(None, limit)
        for n in removed:
            cloud.remove_endpoint(f"tcp://e{n}.page:{n + 1}")
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(len(numbers) + 1):
            page, cursor = cloud.page_endpoints(cursor, limit)
            self.assertLessEqual(len(page), limit)
            seen.extend(endpoint.id for endpoint in page)
            if cursor is None:
                break
        expected = sorted((e.id for e in cloud.endpoints()), reverse=True)
        self.assertEqual(seen, expected)


class _Counting(Resource):
    """
    Counts the requests passed to the resource it wraps.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.requests = 0

    def render(self, request: Any) -> Any:
        self.requests += 1
        return self.wrapped.render(request)


class UnexpectedFailureTests(DiscoveryTestCase):
    """
    A failure that is not the API's is a fault of ngrokd.
    """

    def test_onceWithTraceback(self) -> None:
        """
        It is logged once with its traceback, however many polls meet it;
        polling goes on and recovers.
        """
        script = Script(*[lambda: fail(ZeroDivisionError("broken"))] * 3)
        service = self.start(script)
        self.clock.pump([MAX_BACKOFF] * 3)
        self.assertEqual(script.calls, 4)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(service.failures, 0)
        self.assertEqual(self.delivered, [["ep"]])


class RequestNamedTests(SynchronousTestCase):
    """
    An error answer names the request it answered.
    """

    def test_methodAndPath(self) -> None:
        """
        The message gives the method and the path (not the query).
        """
        cloud = Cloud(CertificateAuthority.create("t"), {"k"}, "ingress:443")
        cloud.faults.next_status(500)
        api = NgrokAPI(
            "https://api.test",
            lambda: "k",
            cast(HTTPRequester, StubTreq(api_resource(cloud, "https://api.test"))),
            Clock(),
        )
        error = self.failureResultOf(api.bound_endpoints("k8sop_1"), APIError).value
        self.assertIn(
            "ngrok API error 500 for GET /kubernetes_operators/k8sop_1/bound_endpoints",
            str(error),
        )
