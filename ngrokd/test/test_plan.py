"""
Tests for L{ngrokd.plan}: which endpoint listens where.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.endpoints import BoundEndpoint, parse_endpoint_url
from ngrokd.names import NameRules
from ngrokd.plan import (
    ListenerChanges,
    ListenSpec,
    listener_changes,
    plan,
    wanted_allocations,
)


def _endpoint(url: str, id: str = "") -> BoundEndpoint:
    return BoundEndpoint(id or f"ep_{url}", url, parse_endpoint_url(url))


_hosts = st.sampled_from(["web.prod", "db.prod", "api.ns", "cache.ns", "x.y"])
_urls = st.one_of(
    st.builds(lambda h: f"http://{h}", _hosts),
    st.builds(lambda h, p: f"tcp://{h}:{p}", _hosts, st.integers(1, 65535)),
    st.builds(lambda h, p: f"http://{h}:{p}", _hosts, st.integers(1, 65535)),
    st.builds(lambda h: f"tls://{h}", _hosts),
)


def _allocate(endpoints: list[BoundEndpoint]):
    hosts = sorted({e.target.host for e in endpoints})
    ips = {h: IPv4Address("10.107.0.2") + i for i, h in enumerate(hosts)}
    keys = sorted({(e.target.host, e.target.port) for e in endpoints})
    ports = {k: 9080 + i for i, k in enumerate(keys)}
    return ips, ports


class PlanTests(SynchronousTestCase):
    """
    L{plan} puts every endpoint on its own address and port.
    """

    def test_ipv6Beside(self) -> None:
        """
        A virtual-mode hostname with an IPv6 address gets an IPv6 listener
        for every endpoint, on the same port; a network-mode one and one
        without an IPv6 address get none. name_addresses() gives each
        virtual-mode name its IPv4 and IPv6 addresses.
        """
        endpoints = [
            _endpoint("http://web.prod"),
            _endpoint("tcp://web.prod:5432"),
            _endpoint("http://db.prod"),
            _endpoint("http://api.ns"),
        ]
        ips, ports = _allocate(endpoints)
        ip6 = IPv6Address("fd00::2")
        result = plan(
            endpoints,
            "virtual",
            {"api.ns": "0.0.0.0"},
            ips,
            ports,
            ips6={"web.prod": ip6, "api.ns": IPv6Address("fd00::9")},
        )
        self.assertEqual(
            {url: (s.address, s.port, s.virtual) for url, s in result.specs6.items()},
            {
                "http://web.prod:80": ("fd00::2", 80, True),
                "tcp://web.prod:5432": ("fd00::2", 5432, True),
            },
        )
        self.assertEqual(
            result.name_addresses(),
            {
                "web.prod": ((ips["web.prod"],), (ip6,)),
                "db.prod": ((ips["db.prod"],), ()),
            },
        )
        self.assertEqual(result.virtual_names()["web.prod"], (ips["web.prod"], ip6))

    def test_ipv6AddressMissing(self) -> None:
        """
        An IPv6 address that could not be set up drops the IPv6 listeners
        on it alone: the endpoint is still planned, on IPv4. An IPv4 address
        missing fails the endpoint, its IPv6 listener with it.
        """
        endpoints = [_endpoint("http://web.prod"), _endpoint("http://db.prod")]
        ips, ports = _allocate(endpoints)
        ips6 = {"web.prod": IPv6Address("fd00::2"), "db.prod": IPv6Address("fd00::3")}
        result = plan(endpoints, "virtual", {}, ips, ports, ips6=ips6)
        kept = result.without_addresses(
            {"fd00::2": "no IPv6 here", str(ips["db.prod"]): "refused"}
        )
        self.assertEqual(set(kept.specs), {"http://web.prod:80"})
        self.assertEqual(kept.specs6, {})
        self.assertEqual(set(kept.failures), {"http://db.prod:80"})

    def test_virtual(self) -> None:
        """
        In virtual mode an endpoint listens on its hostname's address and its
        own port; requests pass untouched.
        """
        endpoints = [_endpoint("http://web.prod"), _endpoint("tcp://web.prod:5432")]
        ips, ports = _allocate(endpoints)
        result = plan(endpoints, "virtual", {}, ips, ports)
        self.assertEqual(
            sorted((s.address, s.port, s.rewrite_host) for s in result.specs.values()),
            [("10.107.0.2", 80, None), ("10.107.0.2", 5432, None)],
        )

    def test_network(self) -> None:
        """
        In network mode an endpoint listens on its network port, and HTTP
        endpoints get their Host rewritten (tcp ones do not).
        """
        endpoints = [_endpoint("http://web.prod"), _endpoint("tcp://db.prod:5432")]
        ips, ports = _allocate(endpoints)
        result = plan(endpoints, "127.0.0.1", {}, ips, ports)
        self.assertEqual(
            sorted((s.address, s.port, s.rewrite_host) for s in result.specs.values()),
            [("127.0.0.1", 9080, None), ("127.0.0.1", 9081, "web.prod")],
        )

    def test_wildcard(self) -> None:
        """
        A wildcard endpoint has one address in virtual mode; in network mode
        its HTTP requests keep their Host, which says the name under it that
        the client meant.
        """
        endpoints = [_endpoint("http://*.apps.prod")]
        ips, ports = _allocate(endpoints)
        virtual = plan(endpoints, "virtual", {}, ips, ports)
        self.assertEqual(
            virtual.name_addresses(),
            {"*.apps.prod": ((IPv4Address("10.107.0.2"),), ())},
        )
        network = plan(endpoints, "127.0.0.1", {}, ips, ports)
        (spec,) = network.specs.values()
        self.assertEqual((spec.port, spec.rewrite_host), (9080, None))

    def test_override(self) -> None:
        """
        A per-hostname override beats the default mode.
        """
        endpoints = [_endpoint("http://web.prod"), _endpoint("http://api.ns")]
        ips, ports = _allocate(endpoints)
        result = plan(endpoints, "virtual", {"web.prod": "0.0.0.0"}, ips, ports)
        modes = {s.target.host: s.address for s in result.specs.values()}
        self.assertEqual(modes, {"web.prod": "0.0.0.0", "api.ns": "10.107.0.2"})

    def test_missingAllocation(self) -> None:
        """
        An endpoint without an address is reported, and the others are planned.
        """
        endpoints = [_endpoint("http://web.prod"), _endpoint("http://api.ns")]
        ips, ports = _allocate(endpoints)
        del ips["web.prod"]
        result = plan(endpoints, "virtual", {}, ips, ports)
        self.assertEqual(list(result.specs), ["http://api.ns:80"])
        self.assertIn("web.prod", result.failures["http://web.prod:80"])

    def test_sharedURL(self) -> None:
        """
        Two endpoints with the same normalised URL are one listener.
        """
        endpoints = [
            _endpoint("http://web.prod", "a"),
            _endpoint("http://web.prod:80", "b"),
        ]
        ips, ports = _allocate(endpoints)
        self.assertEqual(len(plan(endpoints, "virtual", {}, ips, ports).specs), 1)

    def test_sameHostAndPortTwice(self) -> None:
        """
        Two schemes on one host and port cannot share a socket: the first URL
        keeps it and the other is reported as failed, saying which serves it.
        """
        endpoints = [_endpoint("tls://web.prod"), _endpoint("http://web.prod:443")]
        ips, ports = _allocate(endpoints)
        result = plan(endpoints, "virtual", {}, ips, ports)
        self.assertEqual(list(result.specs), ["http://web.prod:443"])
        self.assertEqual(
            result.failures,
            {
                "tls://web.prod:443": "web.prod:443 is already served by http://web.prod:443"
            },
        )

    def test_refusedNames(self) -> None:
        """
        A virtual-mode hostname that is not ngrokd's to claim fails with the
        reason and gets no listener, even with an address at hand; the
        others are planned. In network mode no name is claimed, so none is
        refused.
        """
        endpoints = [
            _endpoint("http://web.prod"),
            _endpoint("http://localhost"),
            _endpoint("tcp://192.0.2.77:5432"),
            _endpoint("https://api.ngrok.com"),
            _endpoint("tcp://db.prod:5432"),
        ]
        ips, ports = _allocate(endpoints)
        names = NameRules(
            reserved={"api.ngrok.com": "the ngrok API's host (api.url)"},
            pinned=frozenset({"db.prod"}),
        )
        result = plan(endpoints, "virtual", {}, ips, ports, names=names)
        self.assertEqual(list(result.specs), ["http://web.prod:80"])
        claim = " is not ngrokd's to claim: "
        self.assertEqual(
            result.failures,
            {
                "http://localhost:80": "localhost"
                + claim
                + "it names this machine itself (RFC 6761)",
                "tcp://192.0.2.77:5432": "192.0.2.77"
                + claim
                + "it reads as an IP address, not a name",
                "https://api.ngrok.com:443": "api.ngrok.com"
                + claim
                + "it is the ngrok API's host (api.url), which ngrokd must reach",
                "tcp://db.prod:5432": "db.prod"
                + claim
                + "the hosts file sets it outside ngrokd's section, and that"
                " address stays",
            },
        )
        network = plan(endpoints, "0.0.0.0", {}, ips, ports, names=names)
        self.assertEqual(network.failures, {})
        self.assertEqual(len(network.specs), len(endpoints))

    @settings(max_examples=500)
    @given(
        urls=st.lists(_urls, max_size=30), mode=st.sampled_from(["virtual", "0.0.0.0"])
    )
    def test_properties(self, urls: list[str], mode: str) -> None:
        """
        For any endpoints: no two listeners share an address and port, every
        endpoint is planned, and the plan does not depend on their order.
        """
        endpoints = [_endpoint(u) for u in urls]
        ips, ports = _allocate(endpoints)
        result = plan(endpoints, mode, {}, ips, ports)
        binds = [s.bind for s in result.specs.values()]
        self.assertEqual(len(binds), len(set(binds)))
        self.assertEqual(
            set(result.specs) | set(result.failures), {e.target.url for e in endpoints}
        )
        for url in result.failures:
            self.assertIn("is already served by", result.failures[url])
        shuffled = list(endpoints)
        random.Random(len(urls)).shuffle(shuffled)
        self.assertEqual(plan(shuffled, mode, {}, ips, ports), result)
        self.assertEqual(plan(endpoints, mode, {}, ips, ports), result)


def _spec(url: str, address: str = "10.107.0.2", port: int = 80) -> ListenSpec:
    return ListenSpec(address, port, parse_endpoint_url(url), virtual=True)


class ListenerChangesTests(SynchronousTestCase):
    """
    L{listener_changes}: what a reconcile does to the running listeners.
    """

    def test_each_kind(self) -> None:
        """
        A listener no longer planned stops, a new one starts, one whose
        address or port moved is rebound, one whose target changed on the
        same socket is updated in place, and one that failed to bind is
        tried again.
        """
        current = {
            "gone": _spec("http://gone.ns"),
            "moved": _spec("http://moved.ns", port=80),
            "retarget": _spec("http://retarget.ns"),
            "failed": _spec("http://failed.ns"),
            "same": _spec("http://same.ns"),
        }
        wanted = {
            "new": _spec("http://new.ns"),
            "moved": _spec("http://moved.ns", port=8080),
            "retarget": attrs.evolve(current["retarget"], rewrite_host="x.ns"),
            "failed": current["failed"],
            "same": current["same"],
        }
        listening = {"gone", "moved", "retarget", "same"}
        self.assertEqual(
            listener_changes(current, listening, wanted),
            ListenerChanges(
                stop=("gone",),
                start=("new",),
                rebind=("moved",),
                update=("retarget",),
                retry=("failed",),
            ),
        )

    def test_changedAndFailed(self) -> None:
        """
        A listener whose last bind failed and whose target changed on the
        same address and port is both updated and tried again.
        """
        current = {"a": _spec("http://a.ns")}
        wanted = {"a": attrs.evolve(current["a"], rewrite_host="x.ns")}
        self.assertEqual(
            listener_changes(current, set(), wanted),
            ListenerChanges(update=("a",), retry=("a",)),
        )

    def test_unchanged(self) -> None:
        """
        The same plan again changes nothing.
        """
        current = {"a": _spec("http://a.ns"), "b": _spec("tcp://b.ns:5432")}
        self.assertEqual(
            listener_changes(current, set(current), dict(current)),
            ListenerChanges(),
        )


class WantedAllocationsTests(SynchronousTestCase):
    """
    L{wanted_allocations}: what each listen mode needs allocated.
    """

    def test_modes(self) -> None:
        """
        A virtual-mode hostname needs one address for all its ports; a
        network-mode endpoint needs a port of its own per host and port.
        """
        endpoints = [
            _endpoint("http://web.prod"),
            _endpoint("tcp://web.prod:5432"),
            _endpoint("tcp://db.prod:5432"),
            _endpoint("http://db.prod"),
        ]
        self.assertEqual(
            wanted_allocations(endpoints, "virtual", {"db.prod": "0.0.0.0"}),
            ({"web.prod"}, {("db.prod", 5432), ("db.prod", 80)}),
        )

    def test_refusedNamesGetNoAddress(self) -> None:
        """
        A virtual-mode hostname that is not ngrokd's to claim needs no
        address; the same name in network mode still needs its port.
        """
        endpoints = [
            _endpoint("http://web.prod"),
            _endpoint("http://localhost"),
            _endpoint("http://db.prod"),
            _endpoint("http://gone.prod"),
        ]
        names = NameRules(pinned=frozenset({"db.prod", "gone.prod"}))
        self.assertEqual(
            wanted_allocations(endpoints, "virtual", {"gone.prod": "0.0.0.0"}, names),
            ({"web.prod"}, {("gone.prod", 80)}),
        )
