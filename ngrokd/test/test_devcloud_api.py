"""
Tests for L{ngrokd.devcloud.cloud} and L{ngrokd.devcloud.api}: ngrokd's real
API client against the real devcloud API over HTTPS on 127.0.0.1.

L{start_devcloud_api} is the fixture other test modules reuse.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, cast

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud, CloudError, CloudOperator, InvalidEndpointURL
from ngrokd.ngrok.api import NgrokAPI, make_api
from ngrokd.ngrok.apierrors import (
    APIError,
    APIResponseInvalid,
    APIUnavailable,
    PaginationError,
)
from ngrokd.ngrok.identity import generate_key, key_public_key, make_csr
from ngrokd.ngrok.trust import load_api_trust

API_KEY = "2devcloudtestkey_abcdefghijklmnop"
INGRESS = "127.0.0.1:4443"


def _policy(ca_bundle: str) -> BrowserLikePolicyForHTTPS:
    """
    HTTPS verified against the CA in C{ca_bundle}, as the daemon's API client.
    """
    return BrowserLikePolicyForHTTPS(load_api_trust(ca_bundle))


class _ConnectionTracker(WrappingFactory):
    """
    Knows when every connection it accepted has closed.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._lost: dict[ProtocolWrapper, Deferred[None]] = {}

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self._lost[p] = Deferred()

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self._lost.pop(p).callback(None)

    def all_closed(self) -> Deferred[list[None]]:
        return gatherResults(list(self._lost.values()))


@frozen
class Devcloud:
    """
    A running devcloud API: its state, its URL, a CA bundle that verifies
    it, and ngrokd's client configured for it.
    """

    cloud: Cloud
    url: str
    ca_bundle: str
    api: NgrokAPI
    case: TestCase

    def client(
        self, key: str = API_KEY, timeout: float = 10, **kwargs: Any
    ) -> NgrokAPI:
        """
        Another ngrokd client for this devcloud (another key, max_pages...).
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(
            reactor,
            contextFactory=_policy(self.ca_bundle),
            pool=pool,
        )
        http = HTTPClient(agent)
        return NgrokAPI(self.url, lambda: key, http, reactor, timeout, **kwargs)

    def raw(self) -> HTTPClient:
        """
        A plain treq client trusting the devcloud, for requests ngrokd's
        client would never send.
        """
        agent = Agent(
            reactor,
            contextFactory=_policy(self.ca_bundle),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        return HTTPClient(agent)


def start_devcloud_api(case: TestCase, **cloud_options: Any) -> Devcloud:
    """
    Serve a new devcloud API over TLS on 127.0.0.1 (a server certificate for
    127.0.0.1 and localhost from the devcloud CA) for the duration of
    C{case}, with ngrokd's client (L{make_api}) trusting that CA.
    """
    ca = CertificateAuthority.create("devcloud test root")
    cert_pem, key_pem = ca.issue_server(["127.0.0.1", "localhost"])
    cloud = Cloud(ca, {API_KEY}, INGRESS, **cloud_options)
    site = Site(Resource())
    tracker = _ConnectionTracker(site)
    options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    port = cast(IReactorSSL, reactor).listenSSL(
        0, cast(ServerFactory[Any], tracker), options, interface="127.0.0.1"
    )
    case.addCleanup(port.stopListening)
    case.addCleanup(tracker.all_closed)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    url = f"https://127.0.0.1:{address.port}"
    site.resource = api_resource(cloud, url, reactor)
    ca_bundle = case.mktemp()
    with open(ca_bundle, "wb") as f:
        f.write(ca.cert_pem)
    api = make_api(reactor, url, lambda: API_KEY, _policy(ca_bundle), timeout=10)
    case.addCleanup(api.close)
    return Devcloud(cloud, url, ca_bundle, api, case)


async def _json(response: Any) -> Any:
    return json.loads(await response.content())


Headers = dict[bytes | str, bytes | str]


def _headers(**extra: str) -> Headers:
    headers: Headers = {"Authorization": f"Bearer {API_KEY}", "Ngrok-Version": "2"}
    headers.update(extra)
    return headers


def _without(name: str) -> Headers:
    headers = _headers()
    del headers[name]
    return headers


def key_public_key_of_cert(cert_pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _register(cloud: Cloud) -> CloudOperator:
    """
    An operator registered directly in the model.
    """
    _, csr = _csr()
    return cloud.register("d", "{}", ["bindings"], "global", {}, ["true"], csr)


def _csr() -> tuple[bytes, bytes]:
    key = generate_key()
    return key, make_csr(key)


class RegistrationTests(TestCase):
    """
    Registering and renewing an operator, over HTTPS.
    """

    timeout = 20

    def setUp(self) -> None:
        self.devcloud = start_devcloud_api(self, cert_days=30)

    @inlineCallbacks
    def test_registerIssuesCertificateForTheKey(self):
        """
        Registering returns a certificate signed by the devcloud CA for the
        CSR's key, the ingress address and the selectors sent.
        """
        key, csr = _csr()
        operator = yield self.devcloud.api.register(
            "ngrokd on test", '{"type": "forward-proxy"}', ["true"], "global", csr
        )
        self.assertTrue(operator.id.startswith("k8sop_"))
        cert = x509.load_pem_x509_certificate(operator.cert_pem)
        ca_key = self.devcloud.cloud.ca.certificate.public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        assert cert.signature_hash_algorithm is not None
        ca_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm),
        )
        self.assertEqual(
            key_public_key(key),
            key_public_key_of_cert(operator.cert_pem),
        )
        self.assertEqual(operator.ingress_endpoint, INGRESS)
        self.assertEqual(operator.selectors, ("true",))
        self.assertEqual(operator.not_after, cert.not_valid_after_utc)
        lifetime = operator.not_after - operator.not_before
        self.assertTrue(
            datetime.timedelta(days=29) < lifetime < datetime.timedelta(days=31)
        )

    @inlineCallbacks
    def test_operatorBodyHasNgrokShape(self):
        """
        The 201 answer to a create has exactly ngrok's fields, RFC 3339
        times and an absolute uri.
        """
        _, csr = _csr()
        body = {
            "description": "d",
            "metadata": "{}",
            "enabled_features": ["bindings"],
            "region": "global",
            "binding": {"endpoint_selectors": ["true"], "csr": csr.decode()},
        }
        response = yield self.devcloud.raw().request(
            "POST",
            f"{self.devcloud.url}/kubernetes_operators",
            headers=_headers(**{"Content-Type": "application/json"}),
            data=json.dumps(body).encode(),
        )
        self.assertEqual(response.code, 201)
        operator = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual(
            sorted(operator),
            sorted(
                [
                    "id",
                    "uri",
                    "created_at",
                    "updated_at",
                    "description",
                    "metadata",
                    "enabled_features",
                    "region",
                    "deployment",
                    "binding",
                ]
            ),
        )
        self.assertEqual(
            sorted(operator["binding"]),
            ["cert", "endpoint_selectors", "ingress_endpoint"],
        )
        self.assertEqual(
            sorted(operator["binding"]["cert"]), ["cert", "not_after", "not_before"]
        )
        self.assertEqual(
            operator["uri"],
            f"{self.devcloud.url}/kubernetes_operators/{operator['id']}",
        )
        self.assertRegex(operator["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertRegex(
            operator["binding"]["cert"]["not_after"],
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
        )

    @inlineCallbacks
    def test_renewalNeedsANewCSR(self):
        """
        PATCHing a new CSR issues a new certificate for the new key;
        re-sending that CSR returns the same certificate again.
        """
        _, csr = _csr()
        first = yield self.devcloud.api.register("d", "{}", ["true"], "global", csr)
        same = yield self.devcloud.api.renew(first.id, csr, ["true"])
        self.assertEqual(same.cert_pem, first.cert_pem)
        key, new_csr = _csr()
        renewed = yield self.devcloud.api.renew(first.id, new_csr, ["true"])
        self.assertNotEqual(renewed.cert_pem, first.cert_pem)
        self.assertEqual(key_public_key(key), key_public_key_of_cert(renewed.cert_pem))
        again = yield self.devcloud.api.renew(first.id, new_csr, ["true"])
        self.assertEqual(again.cert_pem, renewed.cert_pem)

    @inlineCallbacks
    def test_patchChangesSelectors(self):
        """
        A PATCH carrying endpoint selectors replaces them.
        """
        _, csr = _csr()
        first = yield self.devcloud.api.register("d", "{}", ["true"], "global", csr)
        changed = yield self.devcloud.api.renew(first.id, csr, ["endpoint.url != ''"])
        self.assertEqual(changed.selectors, ("endpoint.url != ''",))
        fetched = yield self.devcloud.api.get_operator(first.id)
        self.assertEqual(fetched.selectors, ("endpoint.url != ''",))

    @inlineCallbacks
    def test_bindingsFeatureRequired(self):
        """
        A create without "bindings" in enabled_features is refused with
        ERR_NGROK_19002.
        """
        _, csr = _csr()
        body = {"enabled_features": ["ingress"], "binding": {"csr": csr.decode()}}
        response = yield self.devcloud.raw().request(
            "POST",
            f"{self.devcloud.url}/kubernetes_operators",
            headers=_headers(**{"Content-Type": "application/json"}),
            data=json.dumps(body).encode(),
        )
        self.assertEqual(response.code, 400)
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual(error["error_code"], "ERR_NGROK_19002")
        self.assertEqual(error["status_code"], 400)
        self.assertTrue(error["details"]["operation_id"].startswith("op_"))

    @inlineCallbacks
    def test_accountWithoutBindings(self):
        """
        On an account without the bindings feature, ngrokd's error explains
        that the account lacks Kubernetes bindings.
        """
        self.devcloud.cloud.bindings_enabled = False
        _, csr = _csr()
        d = self.devcloud.api.register("d", "{}", ["true"], "global", csr)
        error = yield self.assertFailure(d, APIError)
        self.assertEqual((error.status, error.error_code), (400, "ERR_NGROK_19002"))
        self.assertIn("does not have the Kubernetes Operators and Bindings", str(error))
        self.assertEqual(self.devcloud.cloud.operators(), [])

    @inlineCallbacks
    def test_invalidCSR(self):
        """
        A CSR that is not PEM is refused with a 400 naming binding.csr.
        """
        d = self.devcloud.api.register("d", "{}", ["true"], "global", b"not a csr")
        error = yield self.assertFailure(d, APIError)
        self.assertEqual((error.status, error.error_code), (400, "ERR_NGROK_215"))
        self.assertIn("binding.csr", error.message)

    @inlineCallbacks
    def test_unknownField(self):
        """
        A field ngrok's API does not have is refused, naming it.
        """
        _, csr = _csr()
        body = {
            "enabled_features": ["bindings"],
            "binding": {"csr": csr.decode(), "name": "x"},
        }
        response = yield self.devcloud.raw().request(
            "POST",
            f"{self.devcloud.url}/kubernetes_operators",
            headers=_headers(**{"Content-Type": "application/json"}),
            data=json.dumps(body).encode(),
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["error_code"]), (400, "ERR_NGROK_214"))
        self.assertIn("binding.name", error["msg"])

    @inlineCallbacks
    def test_deleteThenNotFound(self):
        """
        DELETE answers 204; the operator is then 404, without error_code as
        ngrok's 404s.
        """
        _, csr = _csr()
        operator = yield self.devcloud.api.register("d", "{}", ["true"], "global", csr)
        response = yield self.devcloud.raw().request(
            "DELETE",
            f"{self.devcloud.url}/kubernetes_operators/{operator.id}",
            headers=_headers(),
        )
        self.assertEqual(response.code, 204)
        yield response.content()
        error = yield self.assertFailure(
            self.devcloud.api.get_operator(operator.id), APIError
        )
        self.assertEqual((error.status, error.error_code), (404, None))
        self.assertTrue(error.operation_id.startswith("op_"))


class RequestCheckTests(TestCase):
    """
    Authentication, versioning and not-found answers.
    """

    timeout = 20

    def setUp(self) -> None:
        self.devcloud = start_devcloud_api(self)

    @inlineCallbacks
    def test_wrongKeyNeverInMessage(self):
        """
        A wrong key is refused (403 ERR_NGROK_202, as ngrok does); ngrok's
        message quotes the key back, ngrokd's error never shows it.
        """
        wrong = "3wrongkey_thisMustNotBeLogged"
        response = yield self.devcloud.raw().request(
            "GET",
            f"{self.devcloud.url}/kubernetes_operators",
            headers=_headers(Authorization=f"Bearer {wrong}"),
        )
        raw = yield Deferred.fromCoroutine(_json(response))
        self.assertIn(wrong, raw["msg"])
        client = self.devcloud.client(key=wrong)
        error = yield self.assertFailure(client.operators(), APIError)
        self.assertEqual((error.status, error.error_code), (403, "ERR_NGROK_202"))
        self.assertNotIn(wrong, str(error))
        self.assertNotIn(wrong, repr(error))
        self.assertIn("[redacted]", str(error))

    @inlineCallbacks
    def test_missingAuthorization(self):
        """
        A request without Authorization is refused with ERR_NGROK_200.
        """
        response = yield self.devcloud.raw().request(
            "GET",
            f"{self.devcloud.url}/kubernetes_operators",
            headers=_without("Authorization"),
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["error_code"]), (403, "ERR_NGROK_200"))

    @inlineCallbacks
    def test_versionRequired(self):
        """
        Without Ngrok-Version the API answers 400 ERR_NGROK_218; with another
        version, ERR_NGROK_217.
        """
        url = f"{self.devcloud.url}/kubernetes_operators"
        response = yield self.devcloud.raw().request(
            "GET", url, headers=_without("Ngrok-Version")
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["error_code"]), (400, "ERR_NGROK_218"))
        response = yield self.devcloud.raw().request(
            "GET", url, headers=_headers(**{"Ngrok-Version": "1"})
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["error_code"]), (400, "ERR_NGROK_217"))

    @inlineCallbacks
    def test_unknownOperator(self):
        """
        An unknown operator id is a 404 for the operator and its endpoints.
        """
        calls: list[Deferred[Any]] = [
            self.devcloud.api.get_operator("k8sop_nope"),
            self.devcloud.api.bound_endpoints("k8sop_nope"),
        ]
        for d in calls:
            error = yield self.assertFailure(d, APIError)
            self.assertEqual(error.status, 404)
            self.assertIn("404", str(error))

    @inlineCallbacks
    def test_unknownPath(self):
        """
        Paths the API does not have are JSON 404s too.
        """
        response = yield self.devcloud.raw().request(
            "GET", f"{self.devcloud.url}/tunnels", headers=_headers()
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["status_code"]), (404, 404))

    @inlineCallbacks
    def test_untrustedServer(self):
        """
        A client that does not trust the devcloud's CA gets APIUnavailable
        naming the TLS failure, and sends nothing.
        """
        other = self.mktemp()
        with open(other, "wb") as f:
            f.write(CertificateAuthority.create("someone else").cert_pem)
        api = make_api(
            reactor, self.devcloud.url, lambda: API_KEY, _policy(other), timeout=10
        )
        self.addCleanup(api.close)
        error = yield self.assertFailure(api.operators(), APIUnavailable)
        self.assertIn("certificate verify failed", str(error))

    @inlineCallbacks
    def test_connectionRefused(self):
        """
        Nothing listening is APIUnavailable naming the URL.
        """
        factory = ServerFactory()
        factory.protocol = Protocol
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        number = address.port
        yield port.stopListening()
        url = f"https://127.0.0.1:{number}"
        api = make_api(
            reactor, url, lambda: API_KEY, _policy(self.devcloud.ca_bundle), timeout=10
        )
        self.addCleanup(api.close)
        error = yield self.assertFailure(api.get_operator("k8sop_x"), APIUnavailable)
        self.assertIn(url, str(error))
        self.assertIn("refused", str(error).lower())


class FaultTests(TestCase):
    """
    The devcloud's injected failures, as ngrokd's client sees them.
    """

    timeout = 20

    def setUp(self) -> None:
        self.devcloud = start_devcloud_api(self)
        self.operator = _register(self.devcloud.cloud)

    @inlineCallbacks
    def test_serviceUnavailableWithRetryAfter(self):
        """
        An injected 503 with Retry-After is an APIError carrying the delay;
        the request after it succeeds.
        """
        self.devcloud.cloud.faults.next_status(503, retry_after=7)
        error = yield self.assertFailure(
            self.devcloud.api.get_operator(self.operator.id), APIError
        )
        self.assertEqual((error.status, error.retry_after), (503, 7.0))
        self.assertIn("retry after 7s", str(error))
        operator = yield self.devcloud.api.get_operator(self.operator.id)
        self.assertEqual(operator.id, self.operator.id)

    @inlineCallbacks
    def test_timeoutOverRealTLS(self):
        """
        A devcloud that does not answer makes the request fail after the
        client's timeout; the devcloud drops the abandoned request.
        """
        self.devcloud.cloud.faults.next_delay(60)
        client = self.devcloud.client(timeout=0.2)
        error = yield self.assertFailure(
            client.get_operator(self.operator.id), APIUnavailable
        )
        self.assertIn("no answer in time", str(error))

    @inlineCallbacks
    def test_invalidJSON(self):
        """
        A 200 whose body is not JSON is APIResponseInvalid naming the body.
        """
        self.devcloud.cloud.faults.next_body(b"{oops")
        error = yield self.assertFailure(
            self.devcloud.api.bound_endpoints(self.operator.id), APIResponseInvalid
        )
        self.assertEqual(error.field, "body")

    @inlineCallbacks
    def test_wrongShape(self):
        """
        JSON of the wrong shape is APIResponseInvalid naming the field.
        """
        faults = self.devcloud.cloud.faults
        faults.next_body(b'{"endpoints": 5, "next_page_uri": null}')
        error = yield self.assertFailure(
            self.devcloud.api.bound_endpoints(self.operator.id), APIResponseInvalid
        )
        self.assertEqual(error.field, "endpoints")
        faults.next_body(b'{"endpoints": [{"id": "ep_1", "url": 7}]}')
        error = yield self.assertFailure(
            self.devcloud.api.bound_endpoints(self.operator.id), APIResponseInvalid
        )
        self.assertEqual(error.field, "endpoints[0].url")
        self.assertIn("endpoints[0].url", str(error))
        faults.next_body(b'{"id": "k8sop_1", "binding": {"cert": {"cert": ""}}}')
        error = yield self.assertFailure(
            self.devcloud.api.get_operator(self.operator.id), APIResponseInvalid
        )
        self.assertEqual(error.field, "binding.cert.cert")
        faults.next_body(b"[]")
        error = yield self.assertFailure(
            self.devcloud.api.get_operator(self.operator.id), APIResponseInvalid
        )
        self.assertEqual(error.field, "body")

    @inlineCallbacks
    def test_unparseableEndpointURLPassesThrough(self):
        """
        An endpoint whose url cannot be parsed is still listed, raw: parsing
        is the endpoint module's business.
        """
        self.devcloud.cloud.add_endpoint("http://api.prod", ("127.0.0.1", 1))
        self.devcloud.cloud.faults.extra_endpoints.append(
            {"id": "ep_bad", "url": "http://[::1", "proto": "http"}
        )
        endpoints = yield self.devcloud.api.bound_endpoints(self.operator.id)
        self.assertEqual(
            [(e.id, e.url, e.proto) for e in endpoints][-1],
            ("ep_bad", "http://[::1", "http"),
        )
        self.assertEqual(len(endpoints), 2)


class PaginationTests(TestCase):
    """
    Bound endpoints come in pages; ngrokd reads them all, and stops on loops.
    """

    timeout = 30

    def setUp(self) -> None:
        self.devcloud = start_devcloud_api(self, page_size=100)
        for i in range(250):
            self.devcloud.cloud.add_endpoint(
                f"tcp://svc{i}.ns:{5000 + i}", ("127.0.0.1", 6000 + i)
            )
        self.operator = _register(self.devcloud.cloud)

    @inlineCallbacks
    def test_readsEveryPage(self):
        """
        250 endpoints at 100 a page all arrive, each once.
        """
        endpoints = yield self.devcloud.api.bound_endpoints(self.operator.id)
        self.assertEqual(len(endpoints), 250)
        self.assertEqual(
            {e.url for e in endpoints}, {e.url for e in self.devcloud.cloud.endpoints()}
        )
        self.assertEqual(len({e.id for e in endpoints}), 250)

    @inlineCallbacks
    def test_pagesAreAbsoluteAndShaped(self):
        """
        A page has the endpoints, its uri, and an absolute next_page_uri;
        the last page's is null. Each endpoint has ngrok's fields.
        """
        url = f"{self.devcloud.url}/kubernetes_operators/{self.operator.id}"
        url += "/bound_endpoints"
        raw = self.devcloud.raw()
        pages = []
        next_url = url
        for _ in range(5):
            response = yield raw.request("GET", next_url, headers=_headers())
            page = yield Deferred.fromCoroutine(_json(response))
            pages.append(page)
            next_url = page["next_page_uri"]
            if next_url is None:
                break
        self.assertEqual([len(p["endpoints"]) for p in pages], [100, 100, 50])
        self.assertTrue(pages[0]["next_page_uri"].startswith(url + "?"))
        self.assertEqual(pages[0]["uri"], url)
        endpoint = pages[0]["endpoints"][0]
        for name in [
            "id",
            "url",
            "public_url",
            "proto",
            "scheme",
            "host",
            "port",
            "hostport",
            "type",
            "metadata",
            "description",
            "created_at",
            "updated_at",
            "uri",
        ]:
            self.assertIn(name, endpoint)
        self.assertEqual(endpoint["proto"], "tcp")
        self.assertEqual(endpoint["hostport"], f"{endpoint['host']}:{endpoint['port']}")

    @inlineCallbacks
    def test_limitQuery(self):
        """
        C{limit} sets the page size; out of range is ERR_NGROK_233.
        """
        url = f"{self.devcloud.url}/kubernetes_operators/{self.operator.id}"
        url += "/bound_endpoints"
        response = yield self.devcloud.raw().request(
            "GET", url + "?limit=7", headers=_headers()
        )
        page = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual(len(page["endpoints"]), 7)
        self.assertIn("limit=7", page["next_page_uri"])
        response = yield self.devcloud.raw().request(
            "GET", url + "?limit=1000", headers=_headers()
        )
        error = yield Deferred.fromCoroutine(_json(response))
        self.assertEqual((response.code, error["error_code"]), (400, "ERR_NGROK_233"))

    @inlineCallbacks
    def test_pageLoopDetected(self):
        """
        A next_page_uri naming a page already read fails the listing instead
        of looping.
        """
        self.devcloud.cloud.faults.page_loop = True
        error = yield self.assertFailure(
            self.devcloud.api.bound_endpoints(self.operator.id), PaginationError
        )
        self.assertEqual(error.field, "next_page_uri")
        self.assertIn("already read", str(error))

    @inlineCallbacks
    def test_pageBound(self):
        """
        More pages than the client's bound fails the listing.
        """
        client = self.devcloud.client(max_pages=2)
        error = yield self.assertFailure(
            client.bound_endpoints(self.operator.id), PaginationError
        )
        self.assertIn("more than 2 pages", str(error))

    @inlineCallbacks
    def test_operatorsListed(self):
        """
        Operators are listed across pages too.
        """
        self.devcloud.cloud.page_size = 2
        for _ in range(4):
            _, csr = _csr()
            yield self.devcloud.api.register("d", "{}", ["true"], "global", csr)
        operators = yield self.devcloud.api.operators()
        self.assertEqual(
            sorted(o.id for o in operators),
            sorted(o.id for o in self.devcloud.cloud.operators()),
        )
        self.assertEqual(len(operators), 5)


class CloudTests(SynchronousTestCase):
    """
    The devcloud's model, without HTTP.
    """

    def setUp(self) -> None:
        self.cloud = Cloud(CertificateAuthority.create("t"), {"k"}, INGRESS)

    def test_findEndpointDefaults(self) -> None:
        """
        Endpoints are found by host and port with scheme defaults filled in
        (http 80, https and tls 443); tcp uses its explicit port.
        """
        http = self.cloud.add_endpoint("http://api.prod", ("127.0.0.1", 1))
        https = self.cloud.add_endpoint("https://web.prod", ("127.0.0.1", 2))
        tls = self.cloud.add_endpoint("tls://mq.prod", ("127.0.0.1", 3))
        tcp = self.cloud.add_endpoint("tcp://db.prod:5432", ("127.0.0.1", 4))
        self.assertIs(self.cloud.find_endpoint("api.prod", 80), http)
        self.assertIs(self.cloud.find_endpoint("WEB.prod.", 443), https)
        self.assertIs(self.cloud.find_endpoint("mq.prod", 443), tls)
        self.assertIs(self.cloud.find_endpoint("db.prod", 5432), tcp)
        self.assertIsNone(self.cloud.find_endpoint("db.prod", 5433))
        self.assertIsNone(self.cloud.find_endpoint("api.prod:80", 80))

    def test_endpointIdStable(self) -> None:
        """
        Re-adding a URL keeps its id and replaces its backend; removing it
        makes it unfindable; the id is the same in another devcloud.
        """
        first = self.cloud.add_endpoint("http://api.prod", ("127.0.0.1", 1))
        second = self.cloud.add_endpoint("http://api.prod", ("127.0.0.1", 2))
        self.assertEqual(first.id, second.id)
        self.assertEqual(self.cloud.find_endpoint("api.prod", 80), second)
        other = Cloud(CertificateAuthority.create("u"), {"k"}, INGRESS)
        self.assertEqual(other.add_endpoint("http://api.prod", ("h", 1)).id, first.id)
        self.cloud.remove_endpoint("http://api.prod")
        self.assertIsNone(self.cloud.find_endpoint("api.prod", 80))
        self.assertEqual(self.cloud.endpoints(), [])

    def test_invalidEndpoints(self) -> None:
        """
        URLs the devcloud cannot serve are refused with a reason.
        """
        for url, reason in [
            ("tcp://db.prod", "must give its port"),
            ("ftp://x.y", "scheme"),
            ("http://", "no host"),
            ("http://a.b:99999", "port"),
        ]:
            e = self.assertRaises(
                InvalidEndpointURL, self.cloud.add_endpoint, url, ("h", 1)
            )
            self.assertIn(reason, str(e))
        self.cloud.add_endpoint("http://a.b", ("h", 1))
        e = self.assertRaises(
            InvalidEndpointURL, self.cloud.add_endpoint, "http://a.b:80/", ("h", 2)
        )
        self.assertIn("already", str(e))

    def test_certificateOwners(self) -> None:
        """
        Every certificate issued to an operator (old ones too) maps to it
        until the operator is deleted.
        """
        _, csr = _csr()
        operator = self.cloud.register(
            "d", "{}", ["bindings"], "global", {}, ["true"], csr
        )
        _, new_csr = _csr()
        renewed = self.cloud.update(operator.id, csr_pem=new_csr)
        for cert in [operator.cert, renewed.cert]:
            serial = x509.load_pem_x509_certificate(cert.cert_pem).serial_number
            owner = self.cloud.operator_for_serial(serial)
            self.assertEqual(owner.id if owner else None, operator.id)
        self.cloud.delete_operator(operator.id)
        serial = x509.load_pem_x509_certificate(renewed.cert.cert_pem).serial_number
        self.assertIsNone(self.cloud.operator_for_serial(serial))
        e = self.assertRaises(CloudError, self.cloud.get_operator, operator.id)
        self.assertEqual(e.status, 404)

    def test_faultsScopedByPath(self) -> None:
        """
        A scripted response limited to a path is kept for that path.
        """
        faults = self.cloud.faults
        faults.next_status(503, path_contains="bound_endpoints")
        faults.next_status(429, count=2)
        taken = [
            faults.take("/kubernetes_operators/x"),
            faults.take("/kubernetes_operators/x/bound_endpoints"),
            faults.take("/kubernetes_operators/x/bound_endpoints"),
            faults.take("/kubernetes_operators/x"),
        ]
        self.assertEqual(
            [i.status if i else None for i in taken], [429, 503, 429, None]
        )
