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
            ("http://a.*.prod", ""),
            ("http://*x.prod", ""),
            ("http://*.*.prod", ""),
            ("http://*", ""),
            ("http://*.", ""),
            ("tcp://db.prod:99999", ""),
            ("tcp://db.prod:abc", ""),
            ("http://web.prod", "tcp"),
        ]:
            with self.assertRaises(EndpointURLError) as caught:
                parse_endpoint_url(url, proto)
            self.assertIn(repr(url), str(caught.exception))

    def test_wildcard(self) -> None:
        """
        A wildcard endpoint (C{*.} and a DNS name) is accepted; its
        C{ConnRequest} host is the URL's as written, the star included, for
        the ingress to match the endpoint; the client's own C{Host} or SNI
        says which name under it was meant.
        """
        target = parse_endpoint_url("https://*.Apps.prod")
        self.assertEqual(
            (target.host, target.port, target.is_wildcard), ("*.apps.prod", 443, True)
        )
        self.assertFalse(parse_endpoint_url("http://apps.prod").is_wildcard)

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


class HostnameTests(SynchronousTestCase):
    """
    Only DNS names are accepted as hostnames: a URL from the API must not
    become a hosts line holding a second name, nor a name no resolver takes.
    """

    def test_dnsNames(self) -> None:
        """
        Names of any shape made of RFC 1123 labels are accepted, punycode
        and digits included, up to 253 characters.
        """
        longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
        for host in [
            "controller.example.com",
            "web.prod",
            "localhost",
            "xn--bcher-kva.example",
            "3com.example",
            "a-b.c-d",
            "10.0.0.1",
            longest,
        ]:
            self.assertEqual(parse_endpoint_url(f"tcp://{host}:80").host, host)
        self.assertEqual(len(longest), 253)

    def test_notDNSNames(self) -> None:
        """
        Whitespace, control characters, other characters than letters,
        digits and hyphens, empty or overlong labels, names over 253
        characters and non-ASCII names are refused, naming the URL.
        """
        for url in [
            "http://x victim.example",
            "http://x\tvictim.example",
            "http://x\nvictim.example",
            "http://web.prod\x00",
            "http://web\x7f.prod",
            "http://under_score.prod",
            "http://-web.prod",
            "http://web-.prod",
            "http://web..prod",
            "http://web.prod.",
            "http://" + "a" * 64 + ".prod",
            "http://" + ".".join(["a" * 63] * 4),
            "http://bücher.example",
            "http://\u212aelvin.example",
            "http://web.prod%20x",
        ]:
            with self.assertRaises(EndpointURLError, msg=repr(url)) as caught:
                parse_endpoint_url(url)
            self.assertIn(repr(url)[:50], str(caught.exception))

    def test_longURLQuotedShort(self) -> None:
        """
        A huge URL is named by its start and length, not copied whole into
        the error (and so into the log and status).
        """
        url = "http://" + "a" * 70_000 + ".example"
        with self.assertRaises(EndpointURLError) as caught:
            parse_endpoint_url(url)
        message = str(caught.exception)
        self.assertLess(len(message), 400)
        self.assertIn("70015 characters", message)
        self.assertIn("not a DNS name", message)
