"""
Tests for L{ngrokd.status}: a row for every discovered endpoint, served or
not, with the reason and the counts.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.bridge import BridgeFactory, EndpointStats
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.listeners import Listener
from ngrokd.endpoints import BoundEndpoint, parse_endpoint_url
from ngrokd.plan import ListenSpec, Plan
from ngrokd.status import (
    FAILED,
    LISTENING,
    STARTING,
    EndpointStatus,
    endpoint_status,
)
from ngrokd.test.helpers import ready_status

LISTENING_PORT = cast(Any, object())


def _endpoint(id: str, url: str) -> BoundEndpoint:
    return BoundEndpoint(id, url, parse_endpoint_url(url))


def _listener(
    address: str,
    port: int,
    url: str,
    listening: bool = True,
    error: str = "",
    stats: EndpointStats | None = None,
    client_address: str = "",
    virtual: bool = False,
) -> Listener:
    target = parse_endpoint_url(url)
    spec = ListenSpec(
        address, port, target, client_address=client_address, virtual=virtual
    )
    factory = BridgeFactory(target, cast(IngressConnector, None), None, stats)
    return Listener(spec, factory, LISTENING_PORT if listening else None, error)


def _state(
    endpoints: list[BoundEndpoint],
    listeners: list[Listener],
    failures: dict[str, str] | None = None,
    skipped: dict[str, str] | None = None,
) -> tuple[EndpointStatus, ...]:
    by_url = {x.spec.target.url: x for x in listeners}
    plan = Plan({url: x.spec for url, x in by_url.items()}, failures or {})
    return endpoint_status({e.id: e for e in endpoints}, skipped or {}, plan, by_url)


class EndpointStatusTests(SynchronousTestCase):
    """
    L{endpoint_status} shows every endpoint, served or not.
    """

    def test_listening(self) -> None:
        """
        A listening endpoint shows where, what local clients use, and what it
        carried.
        """
        stats = EndpointStats(1, 5, 0, 100, 2000)
        (row,) = _state(
            [_endpoint("ep_1", "http://web.prod")],
            [
                _listener(
                    "10.107.0.2",
                    80,
                    "http://web.prod",
                    stats=stats,
                    client_address="web.prod:80",
                    virtual=True,
                )
            ],
        )
        self.assertEqual(
            row,
            EndpointStatus(
                id="ep_1",
                url="http://web.prod",
                listen_address="10.107.0.2:80",
                state=LISTENING,
                reason="",
                client_address="web.prod:80",
                connections_open=1,
                connections_total=5,
                errors=0,
                bytes_up=100,
                bytes_down=2000,
                mode="virtual",
                addresses=("10.107.0.2",),
            ),
        )

    def test_wildcardWithoutDNS(self) -> None:
        """
        A listening endpoint whose name cannot be reached (a wildcard, when
        DNS does not serve the system) says why, unless it has a worse
        reason.
        """
        url = "http://*.apps.prod"
        by_url = {url + ":80": _listener("10.107.0.2", 80, url)}
        plan = Plan({key: x.spec for key, x in by_url.items()}, {})
        (row,) = endpoint_status(
            {"ep_1": _endpoint("ep_1", url)},
            {},
            plan,
            by_url,
            unnamed={"*.apps.prod": "no name under apps.prod reaches it"},
        )
        self.assertEqual(
            (row.state, row.reason), (LISTENING, "no name under apps.prod reaches it")
        )

    def test_ipv6Listener(self) -> None:
        """
        An endpoint that listens on its name's IPv6 address too shows both
        addresses; one whose IPv6 socket could not be bound shows its IPv4
        address, listening, and why not IPv6.
        """
        v4 = _listener("10.107.0.2", 80, "http://web.prod", virtual=True)
        v6 = _listener("fd00::2", 80, "http://web.prod", virtual=True)
        url = v4.spec.target.url
        plan = Plan({url: v4.spec}, {}, specs6={url: v6.spec})
        endpoints = {"ep_1": _endpoint("ep_1", "http://web.prod")}
        (row,) = endpoint_status(endpoints, {}, plan, {url: v4}, listeners6={url: v6})
        self.assertEqual(
            (row.state, row.addresses, row.ipv6_error),
            (LISTENING, ("10.107.0.2", "fd00::2"), ""),
        )
        failed = _listener(
            "fd00::2", 80, "http://web.prod", listening=False, error="[fd00::2]:80: no"
        )
        (row,) = endpoint_status(
            endpoints, {}, plan, {url: v4}, listeners6={url: failed}
        )
        self.assertEqual(
            (row.state, row.addresses, row.ipv6_error),
            (LISTENING, ("10.107.0.2",), "[fd00::2]:80: no"),
        )

    def test_lastConnectionFailed(self) -> None:
        """
        A listening endpoint whose last connection failed says why.
        """
        stats = EndpointStats(errors=3, last_error="ERR_NGROK_3200: offline")
        (row,) = _state(
            [_endpoint("ep_1", "tcp://db.prod:5432")],
            [_listener("10.107.0.2", 5432, "tcp://db.prod:5432", stats=stats)],
        )
        self.assertEqual(row.state, LISTENING)
        self.assertEqual(row.reason, "last connection failed: ERR_NGROK_3200: offline")
        self.assertEqual(row.errors, 3)

    def test_certificateExpired(self) -> None:
        """
        While the client certificate is expired, every listening endpoint
        says so, rather than the failure of its last connection.
        """
        stats = EndpointStats(errors=1, last_error="TLS failed: alert")
        expired = "the certificate /etc/ngrokd/tls.crt expired at 2026-01-01"
        by_url = {
            x.spec.target.url: x
            for x in [
                _listener("10.107.0.2", 5432, "tcp://db.prod:5432", stats=stats),
                _listener("10.107.0.3", 80, "http://web.prod", listening=False),
            ]
        }
        plan = Plan({url: x.spec for url, x in by_url.items()}, {})
        endpoints = [
            _endpoint("ep_1", "tcp://db.prod:5432"),
            _endpoint("ep_2", "http://web.prod"),
        ]
        rows = endpoint_status(
            {e.id: e for e in endpoints}, {}, plan, by_url, certificate_problem=expired
        )
        self.assertEqual(
            [(row.state, row.reason) for row in rows],
            [(STARTING, ""), (LISTENING, expired)],
        )

    def test_bindFailed(self) -> None:
        """
        A listener that could not bind is failed with the reason, at the
        address it tried.
        """
        reason = "127.0.0.1:9080 is already in use by nginx (pid 42)"
        (row,) = _state(
            [_endpoint("ep_1", "tcp://db.prod:5432")],
            [_listener("127.0.0.1", 9080, "tcp://db.prod:5432", False, reason)],
        )
        self.assertEqual(
            (row.state, row.reason, row.listen_address),
            (FAILED, reason, "127.0.0.1:9080"),
        )

    def test_planFailed(self) -> None:
        """
        An endpoint the plan could not place is failed with the reason and
        no address.
        """
        url = parse_endpoint_url("http://web.prod").url
        (row,) = _state(
            [_endpoint("ep_1", "http://web.prod")],
            [],
            failures={url: "no address could be allocated for web.prod"},
        )
        self.assertEqual(
            (row.state, row.reason, row.listen_address),
            (FAILED, "no address could be allocated for web.prod", ""),
        )

    def test_skipped(self) -> None:
        """
        An endpoint whose URL could not be read is failed, by its id.
        """
        (row,) = _state([], [], skipped={"ep_bad": "'tcp://x': must give its port"})
        self.assertEqual(
            (row.id, row.state, row.reason),
            ("ep_bad", FAILED, "'tcp://x': must give its port"),
        )

    def test_starting(self) -> None:
        """
        An endpoint planned but not yet bound, or not yet tried, is starting.
        """
        rows = _state(
            [_endpoint("ep_1", "tcp://a.ns:1"), _endpoint("ep_2", "tcp://b.ns:2")],
            [_listener("127.0.0.1", 9081, "tcp://b.ns:2", listening=False)],
        )
        self.assertEqual([row.state for row in rows], [STARTING, STARTING])

    def test_ipv6(self) -> None:
        """
        An IPv6 listen address is written in brackets.
        """
        (row,) = _state(
            [_endpoint("ep_1", "tcp://a.ns:1")],
            [_listener("::1", 9080, "tcp://a.ns:1")],
        )
        self.assertEqual(row.listen_address, "[::1]:9080")

    def test_sharedListenerAndOrder(self) -> None:
        """
        Endpoints sharing a URL share the listener's counts; rows are
        ordered by URL, then id.
        """
        stats = EndpointStats(connections_total=7)
        rows = _state(
            [
                _endpoint("ep_b", "http://web.prod"),
                _endpoint("ep_a", "http://web.prod:80"),
                _endpoint("ep_c", "http://api.prod"),
            ],
            [
                _listener("10.107.0.2", 80, "http://web.prod", stats=stats),
                _listener("10.107.0.3", 80, "http://api.prod"),
            ],
        )
        self.assertEqual(
            [(row.url, row.id) for row in rows],
            [
                ("http://api.prod", "ep_c"),
                ("http://web.prod", "ep_b"),
                ("http://web.prod:80", "ep_a"),
            ],
        )
        self.assertEqual([row.connections_total for row in rows], [0, 7, 7])


class DaemonStatusTests(SynchronousTestCase):
    """
    L{DaemonStatus.ready} and the reason it is not.
    """

    def test_ready(self) -> None:
        """
        Registered, polled and every planned listener up is ready; so is a
        daemon with no endpoints at all.
        """
        for status in [
            ready_status(),
            ready_status(listeners_planned=0, listeners_up=0),
        ]:
            self.assertEqual((status.ready, status.not_ready_because), (True, ""))
        self.assertEqual(ready_status().uptime, 60.0)

    def test_notReady(self) -> None:
        """
        The first missing step is the reason, with its error when there is
        one.
        """
        for status, reason in [
            (
                ready_status(operator_id="", identity_state="registering"),
                "registering",
            ),
            (
                ready_status(
                    operator_id="",
                    identity_state="not registered",
                    identity_error="ngrok API unavailable",
                    polled=False,
                ),
                "not registered: ngrok API unavailable",
            ),
            (
                ready_status(polled=False),
                "the bound endpoints have not been read yet",
            ),
            (
                ready_status(polled=False, poll_error="401 ERR_NGROK_201"),
                "the bound endpoints have not been read yet: 401 ERR_NGROK_201",
            ),
            (ready_status(listeners_up=1), "1 of 2 listeners are up"),
        ]:
            self.assertEqual((status.ready, status.not_ready_because), (False, reason))

    def test_notServing(self) -> None:
        """
        A daemon is not ready while an endpoint that should listen does not:
        failed before it was planned (no address, or the address could not
        be set up), or after (port in use); nor while the names cannot be
        written, nor with an expired certificate.
        """
        for status, reason in [
            (
                ready_status(
                    listeners_planned=0, listeners_up=0, listeners_unplanned=5
                ),
                "0 of 5 listeners are up",
            ),
            (ready_status(listeners_unplanned=1), "2 of 3 listeners are up"),
            (
                ready_status(names_error="cannot lock /etc/hosts: busy"),
                "endpoint names do not resolve: cannot lock /etc/hosts: busy",
            ),
            (
                ready_status(certificate_expires=160.0, identity_error="renew it"),
                "the client certificate has expired: renew it",
            ),
        ]:
            self.assertEqual((status.ready, status.not_ready_because), (False, reason))
        self.assertTrue(ready_status(certificate_expires=160.5).ready)

    def test_namesAsConfigured(self) -> None:
        """
        Names in the hosts file because DNS did not work make the daemon
        unready when dns.mode asked for a way by name, not when it was
        auto (the hosts file is auto's last choice).
        """
        strict = ready_status(
            names_fallback="systemd-resolved stopped", names_strict=True
        )
        self.assertEqual(
            strict.not_ready_because,
            "endpoint names do not resolve as configured (the hosts file serves"
            " them meanwhile): systemd-resolved stopped",
        )
        self.assertTrue(ready_status(names_fallback="systemd-resolved stopped").ready)
