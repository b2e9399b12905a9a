"""
Tests for L{ngrokd.endpoints}: what a bound endpoint URL addresses.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.endpoints import EndpointTarget, EndpointURLError, parse_endpoint_url


class ParseEndpointURLTests(SynchronousTestCase):
    """
    URLs become (scheme, hostname, port) with the scheme's default port.
    """

    def test_defaults(self) -> None:
        """
        http is 80, https and tls are 443; tcp must say its port.
        """
        cases = {
            "http://web.prod": EndpointTarget("http", "web.prod", 80),
            "https://api.example.app": EndpointTarget("https", "api.example.app", 443),
            "tls://svc.ns": EndpointTarget("tls", "svc.ns", 443),
            "tls://svc.ns:8443": EndpointTarget("tls", "svc.ns", 8443),
            "tcp://db.prod:5432": EndpointTarget("tcp", "db.prod", 5432),
            "http://web.prod:8080/": EndpointTarget("http", "web.prod", 8080),
        }
        for url, expected in cases.items():
            self.assertEqual(parse_endpoint_url(url), expected, url)

    def test_hostnameOnly(self) -> None:
        """
        The host never carries the port (the Go original's fault 4), and is
        lowercased.
        """
        target = parse_endpoint_url("tcp://DB.Prod:5432")
        self.assertEqual((target.host, target.port), ("db.prod", 5432))

    def test_noSchemeTakesProto(self) -> None:
        """
        A URL without a scheme takes the endpoint's proto, else https.
        """
        self.assertEqual(parse_endpoint_url("web.prod", "http").scheme, "http")
        self.assertEqual(parse_endpoint_url("web.prod").port, 443)

    def test_refused(self) -> None:
        """
        Unusable URLs raise L{EndpointURLError} naming the URL.
        """
        for url, proto in [
            ("tcp://db.prod", ""),
            ("ftp://x.y", ""),
            ("http://", ""),
            ("http://*.prod", ""),
            ("tcp://db.prod:99999", ""),
            ("tcp://db.prod:abc", ""),
            ("http://web.prod", "tcp"),
        ]:
            with self.assertRaises(EndpointURLError) as caught:
                parse_endpoint_url(url, proto)
            self.assertIn(repr(url), str(caught.exception))

    def test_httpHost(self) -> None:
        """
        The Host header omits a default port and keeps any other.
        """
        self.assertEqual(parse_endpoint_url("http://web.prod").http_host, "web.prod")
        self.assertEqual(
            parse_endpoint_url("http://web.prod:8080").http_host, "web.prod:8080"
        )

    def test_normalisedURL(self) -> None:
        """
        URLs that differ only in an explicit default port are one endpoint.
        """
        self.assertEqual(
            parse_endpoint_url("http://web.prod").url,
            parse_endpoint_url("http://web.prod:80").url,
        )
