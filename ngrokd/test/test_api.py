"""
Tests for L{ngrokd.ngrok.api} in memory (L{StubTreq}, L{Clock}): timing, headers
and answers the devcloud would not give. The same client against the real
devcloud over HTTPS is in L{ngrokd.test.test_devcloud_api}.
"""

from __future__ import annotations

import json
from typing import Any, cast

from attrs import frozen
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from ngrokd import __version__
from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud
from ngrokd.ngrok.answers import MAX_BODY, MAX_STRING, retry_after_seconds
from ngrokd.ngrok.api import HTTPRequester, NgrokAPI
from ngrokd.ngrok.apierrors import (
    APIError,
    APIResponseInvalid,
    APIUnavailable,
    NoAPIKey,
)
from ngrokd.ngrok.identity import generate_key, make_csr

BASE = "https://api.test"
KEY = "2testkey_secret"


@frozen
class Recorded:
    method: str
    uri: str
    headers: dict[str, str]
    body: bytes


class Scripted(Resource):
    """
    Answers requests with scripted (status, body, headers) in order, and
    records them.
    """

    isLeaf = True

    def __init__(self, *answers: tuple[int, Any, dict[str, str]]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[Recorded] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.requests.append(
            Recorded(
                request.method.decode(),
                request.uri.decode(),
                {
                    k.decode().lower(): v[0].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                request.content.read(),
            )
        )
        status, body, headers = self.answers.pop(0)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body if isinstance(body, bytes) else json.dumps(body).encode()


def _page(*ids: str, next_page: str | None = None) -> tuple[int, Any, dict[str, str]]:
    endpoints = [{"id": i, "url": f"http://{i}.ns", "proto": "http"} for i in ids]
    return 200, {"endpoints": endpoints, "uri": "", "next_page_uri": next_page}, {}


def _client(
    resource: Resource, clock: Clock, key: Any = lambda: KEY, **limits: Any
) -> NgrokAPI:
    return NgrokAPI(
        BASE, key, cast(HTTPRequester, StubTreq(resource)), clock, 10, **limits
    )


class TimeoutTests(SynchronousTestCase):
    """
    Requests time out on the given clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cloud = Cloud(CertificateAuthority.create("t"), {KEY}, "ingress:443")
        self.operator = self.cloud.register(
            "d", "{}", ["bindings"], "global", {}, ["true"], make_csr(generate_key())
        )
        self.stub = StubTreq(api_resource(self.cloud, BASE, self.clock))
        self.api = NgrokAPI(
            BASE, lambda: KEY, cast(HTTPRequester, self.stub), self.clock, timeout=10
        )

    def test_slowAnswerTimesOut(self) -> None:
        """
        No answer within the timeout is APIUnavailable, on the clock given.
        """
        self.cloud.faults.next_delay(60)
        d = self.api.get_operator(self.operator.id)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, APIUnavailable).value
        self.assertIn("no answer in time", str(error))
        self.assertIn(BASE, str(error))

    def test_answerWithinTimeout(self) -> None:
        """
        A late answer inside the timeout is used.
        """
        self.cloud.faults.next_delay(5)
        d = self.api.get_operator(self.operator.id)
        self.clock.advance(5)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).id, self.operator.id)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelIsNotATimeout(self) -> None:
        """
        Cancelling a listing (the daemon stopping) is a cancellation, not an
        unavailable API.
        """
        self.cloud.faults.next_delay(60)
        d = self.api.bound_endpoints(self.operator.id)
        d.cancel()
        self.failureResultOf(d, CancelledError)


class RequestTests(SynchronousTestCase):
    """
    What the client sends.
    """

    def test_headers(self) -> None:
        """
        Every request carries the bearer key, Ngrok-Version 2 and ngrokd's
        User-Agent; only requests with a body say it is JSON.
        """
        operator = {
            "id": "k8sop_1",
            "binding": {
                "cert": {
                    "cert": "PEM",
                    "not_before": "2025-01-01T00:00:00Z",
                    "not_after": "2026-01-01T00:00:00Z",
                },
                "ingress_endpoint": "i:443",
            },
        }
        resource = Scripted((201, operator, {}), (200, operator, {}))
        api = _client(resource, Clock())
        self.successResultOf(api.register("d", "{}", ["true"], "global", b"CSR"))
        self.successResultOf(api.get_operator("k8sop_1"))
        post, get = resource.requests
        for request in (post, get):
            self.assertEqual(request.headers["authorization"], f"Bearer {KEY}")
            self.assertEqual(request.headers["ngrok-version"], "2")
            self.assertEqual(request.headers["user-agent"], f"ngrokd/{__version__}")
        self.assertEqual(post.headers["content-type"], "application/json")
        self.assertNotIn("content-type", get.headers)
        self.assertEqual(
            (get.method, get.uri), ("GET", "/kubernetes_operators/k8sop_1")
        )

    def test_registerBody(self) -> None:
        """
        Registration asks for the bindings feature with the selectors and
        CSR given, and no field ngrok's API lacks.
        """
        resource = Scripted((500, b"", {}))
        api = _client(resource, Clock())
        self.failureResultOf(
            api.register("ngrokd on h", '{"a": 1}', ["true", "x"], "global", b"CSR"),
            APIError,
        )
        self.assertEqual(
            json.loads(resource.requests[0].body),
            {
                "description": "ngrokd on h",
                "metadata": '{"a": 1}',
                "enabled_features": ["bindings"],
                "region": "global",
                "binding": {"endpoint_selectors": ["true", "x"], "csr": "CSR"},
            },
        )

    def test_keyReadPerRequest(self) -> None:
        """
        A key changed at run time is used by the next request.
        """
        keys = ["first", "second"]
        resource = Scripted(_page(), _page())
        api = _client(resource, Clock(), key=lambda: keys[0])
        self.successResultOf(api.bound_endpoints("k8sop_1"))
        keys.pop(0)
        self.successResultOf(api.bound_endpoints("k8sop_1"))
        self.assertEqual(
            [r.headers["authorization"] for r in resource.requests],
            ["Bearer first", "Bearer second"],
        )

    def test_noKey(self) -> None:
        """
        Without a key nothing is sent and the error says how to set one.
        """
        resource = Scripted()
        api = _client(resource, Clock(), key=lambda: "  ")
        error = self.failureResultOf(api.bound_endpoints("k8sop_1"), NoAPIKey).value
        self.assertIn("set-api-key", str(error))
        self.assertEqual(resource.requests, [])

    def test_emptyOperatorId(self) -> None:
        """
        An empty operator id is refused locally.
        """
        api = _client(Scripted(), Clock())
        self.assertRaises(ValueError, api.bound_endpoints, " ")


class AnswerTests(SynchronousTestCase):
    """
    How answers turn into values and errors.
    """

    def test_retryAfterDate(self) -> None:
        """
        A 429 with an HTTP-date Retry-After gives the seconds until then.
        """
        clock = Clock()
        clock.advance(1445412470)
        headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
        body = {"error_code": "ERR_NGROK_226", "status_code": 429, "msg": "slow"}
        api = _client(Scripted((429, body, headers)), clock)
        error = self.failureResultOf(api.bound_endpoints("k8sop_1"), APIError).value
        self.assertEqual((error.status, error.retry_after), (429, 10.0))

    def test_retryAfterValues(self) -> None:
        """
        Retry-After is seconds or an HTTP date; anything else is ignored.
        """
        self.assertEqual(retry_after_seconds("120", 0), 120.0)
        self.assertIsNone(retry_after_seconds("soon", 0))
        self.assertIsNone(retry_after_seconds(None, 0))
        self.assertEqual(
            retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490), 0.0
        )

    def test_errorWithoutJSON(self) -> None:
        """
        An error page that is not ngrok's JSON (a proxy's 502) still gives a
        readable APIError, with the operation id from the header if any.
        """
        page = b"<html>Bad Gateway</html>"
        headers = {"Ngrok-Operation-Id": "op_9"}
        api = _client(Scripted((502, page, headers)), Clock())
        error = self.failureResultOf(api.bound_endpoints("k8sop_1"), APIError).value
        self.assertEqual((error.status, error.error_code), (502, None))
        self.assertEqual(error.operation_id, "op_9")
        self.assertIn("Bad Gateway", str(error))

    def test_keyRedactedFromServerMessage(self) -> None:
        """
        ngrok quotes a wrong key back; the error ngrokd shows does not.
        """
        body = {
            "error_code": "ERR_NGROK_202",
            "status_code": 403,
            "msg": f"Your credential: '{KEY}'.",
            "details": {"operation_id": "op_1"},
        }
        api = _client(Scripted((403, body, {})), Clock())
        error = self.failureResultOf(api.bound_endpoints("k8sop_1"), APIError).value
        self.assertNotIn(KEY, str(error))
        self.assertNotIn(KEY, error.message)
        self.assertIn("check api.key", str(error))

    def test_missingListIsInvalid(self) -> None:
        """
        A listing without its list is invalid, never "no endpoints" (which
        would tear down every listener).
        """
        api = _client(Scripted((200, {"next_page_uri": None}, {})), Clock())
        error = self.failureResultOf(
            api.bound_endpoints("k8sop_1"), APIResponseInvalid
        ).value
        self.assertEqual((error.field, error.problem), ("endpoints", "not a list"))

    def test_publicURLFallback(self) -> None:
        """
        An endpoint with only the deprecated public_url is listed with it.
        """
        page = {"endpoints": [{"id": "ep_1", "public_url": "tcp://db.ns:5432"}]}
        api = _client(Scripted((200, page, {})), Clock())
        [endpoint] = self.successResultOf(api.bound_endpoints("k8sop_1"))
        self.assertEqual((endpoint.url, endpoint.proto), ("tcp://db.ns:5432", ""))


class PaginationTests(SynchronousTestCase):
    """
    Following next_page_uri.
    """

    def test_relativeNextPage(self) -> None:
        """
        A relative next_page_uri is followed on the API's origin.
        """
        resource = Scripted(
            _page("a", next_page="/kubernetes_operators/k8sop_1/bound_endpoints?x=1"),
            _page("b"),
        )
        api = _client(resource, Clock())
        endpoints = self.successResultOf(api.bound_endpoints("k8sop_1"))
        self.assertEqual([e.id for e in endpoints], ["a", "b"])
        self.assertEqual(
            resource.requests[1].uri,
            "/kubernetes_operators/k8sop_1/bound_endpoints?x=1",
        )

    def test_emptyPageEnds(self) -> None:
        """
        An empty page ends the listing even if it names a next page.
        """
        resource = Scripted(_page(next_page=f"{BASE}/kubernetes_operators?p=2"))
        api = _client(resource, Clock())
        self.assertEqual(self.successResultOf(api.bound_endpoints("k8sop_1")), [])
        self.assertEqual(len(resource.requests), 1)

    def test_foreignNextPageRefused(self) -> None:
        """
        A next_page_uri on another origin is refused before the key is sent
        there.
        """
        resource = Scripted(_page("a", next_page="https://elsewhere.test/steal"))
        api = _client(resource, Clock())
        error = self.failureResultOf(
            api.bound_endpoints("k8sop_1"), APIResponseInvalid
        ).value
        self.assertEqual(error.field, "next_page_uri")
        self.assertIn("elsewhere.test", str(error))
        self.assertEqual(len(resource.requests), 1)


class BoundedAnswerTests(SynchronousTestCase):
    """
    Nothing read from an answer is unbounded: an answer beyond a limit is
    refused with an error naming the limit, and nothing of it is used.
    """

    def refused(self, *answers: tuple[int, Any, dict[str, str]]) -> Any:
        api = _client(Scripted(*answers), Clock(), max_items=3)
        return self.failureResultOf(
            api.bound_endpoints("k8sop_1"), APIResponseInvalid
        ).value

    def test_bodyTooLarge(self) -> None:
        """
        A body larger than L{MAX_BODY} is refused.
        """
        body = b'{"endpoints": [], "pad": "' + b"x" * MAX_BODY + b'"}'
        error = self.refused((200, body, {}))
        self.assertEqual(error.field, "body")
        self.assertIn(f"larger than {MAX_BODY} bytes", str(error))

    def test_stringTooLong(self) -> None:
        """
        A string longer than L{MAX_STRING} is refused, naming the field.
        """
        page = {"endpoints": [{"id": "ep_1", "url": "tcp://" + "a" * 70_000}]}
        error = self.refused((200, page, {}))
        self.assertEqual(error.field, "endpoints[0].url")
        self.assertIn(f"longer than {MAX_STRING} characters (70006)", str(error))
        self.assertLess(len(str(error)), 300)

    def test_tooManyItems(self) -> None:
        """
        More items than the limit in one listing (over several pages) is an
        error, not a truncated list.
        """
        error = self.refused(
            _page("a", "b", next_page=f"{BASE}/kubernetes_operators?p=2"),
            _page("c", "d"),
        )
        self.assertIn("more than 3 endpoints", str(error))

    def test_listingDeadline(self) -> None:
        """
        A listing whose pages each come in time, but which takes longer than
        its deadline as a whole, fails as an unavailable API.
        """
        clock = Clock()
        cloud = Cloud(CertificateAuthority.create("t"), {KEY}, "ingress:443")
        cloud.page_size = 1
        for n in range(4):
            cloud.add_endpoint(f"tcp://e{n}.test:80", ("127.0.0.1", 1))
        operator = cloud.register(
            "d", "{}", ["bindings"], "global", {}, ["true"], make_csr(generate_key())
        )
        cloud.faults.next_delay(8, count=4)
        stub = StubTreq(api_resource(cloud, BASE, clock))
        api = NgrokAPI(
            BASE,
            lambda: KEY,
            cast(HTTPRequester, stub),
            clock,
            timeout=10,
            listing_timeout=20,
        )
        d = api.bound_endpoints(operator.id)
        for _ in range(2):
            clock.advance(8)
            stub.flush()
        self.assertNoResult(d)
        clock.advance(4)
        error = self.failureResultOf(d, APIUnavailable).value
        self.assertIn("the listing of endpoints did not end within 20s", str(error))
