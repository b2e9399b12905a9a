"""
Tests for L{ngrokd.board}: the kept rows are always the rows a full
rebuild (L{ngrokd.status.endpoint_status}) would make, whatever changed,
and their indexes page and filter as a scan of every row would.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from attrs import define, field
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.board import RowIndex, StatusBoard
from ngrokd.daemon import Daemon
from ngrokd.datapath.bridge import EndpointStats
from ngrokd.endpoints import BoundEndpoint, parse_endpoint_url
from ngrokd.plan import ListenSpec, Plan
from ngrokd.status import FAILED, LISTENING, STARTING, EndpointStatus, endpoint_status
from ngrokd.test.helpers import Recorder, connect, wait_until
from ngrokd.test.test_health import DaemonHealthTestCase

ECHO = "tcp://echo.test:7000"
OTHER = "tcp://other.test:7001"

#: Few URLs for many ids, so that endpoints share listeners.
URLS = [f"tcp://db{n}.ns:5432" for n in range(6)] + [
    f"http://web{n}.ns" for n in range(4)
]
IDS = [f"ep_{n}" for n in range(12)]


@define
class FakeListener:
    """
    A listener as status reads it, changed by the machine as the data path
    changes the real ones.
    """

    spec: ListenSpec
    listening: bool = False
    error: str = ""
    stats: EndpointStats = field(factory=EndpointStats)


def _spec(url: str, port: int, virtual: bool) -> ListenSpec:
    target = parse_endpoint_url(url)
    address = f"10.107.0.{port}" if virtual else "127.0.0.1"
    client = f"{target.host}:{target.port}" if virtual else f"127.0.0.1:{port}"
    return ListenSpec(address, port, target, None, virtual, client)


def _spec6(spec: ListenSpec) -> ListenSpec:
    """
    The IPv6 listener of virtual-mode C{spec}.
    """
    return attrs.evolve(spec, address=f"fd00::{spec.port}")


class BoardMachine(RuleBasedStateMachine):
    """
    Random reconciles (endpoints added, removed, moved to another URL,
    skipped; plans that move, fail or drop listeners, IPv6 ones too), binds
    that work or fail on either, connections that open, fail, get through
    and close with their bytes, hostnames that can or cannot be reached by
    name, and the daemon-wide facts turning on and off; after each, the
    kept rows equal a full rebuild.
    """

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[str, BoundEndpoint] = {}
        self.skipped: dict[str, str] = {}
        self.plan = Plan({}, {})
        self.listeners: dict[str, FakeListener] = {}
        self.listeners6: dict[str, FakeListener] = {}
        self.unnamed: dict[str, str] = {}
        self.problem = ""
        self.stale = False
        self.board = StatusBoard(
            lambda: self.listeners,
            lambda: (self.problem, self.stale),
            lambda: self.listeners6,
        )
        self.seen: list[str] = []
        self.board.watch(self.seen.append)

    @rule(
        chosen=st.dictionaries(
            st.sampled_from(IDS), st.sampled_from([*URLS, "bad://x"]), max_size=10
        ),
        decisions=st.dictionaries(
            st.sampled_from(URLS),
            st.one_of(
                st.tuples(st.integers(1, 3), st.booleans()),
                st.sampled_from(["no address left", "refused"]),
            ),
        ),
        partial=st.integers(0, 3),
        ipv6=st.sets(st.sampled_from(URLS)),
    )
    def reconcile(
        self,
        chosen: dict[str, str],
        decisions: dict[str, tuple[int, bool] | str],
        partial: int,
        ipv6: set[str],
    ) -> None:
        """
        As L{ngrokd.daemon.Daemon} applies a poll: the endpoints first, then
        the plan, then the listeners; rows are made in slices meanwhile.
        """
        endpoints = {
            id: BoundEndpoint(id, url, parse_endpoint_url(url))
            for id, url in chosen.items()
            if url != "bad://x"
        }
        # The same values again are new objects, as a poll makes them.
        self.endpoints = endpoints
        self.skipped = {
            id: f"{url}: not a URL ngrokd serves"
            for id, url in chosen.items()
            if url == "bad://x"
        }
        self.board.reconciled(self.endpoints, self.skipped, self.plan)
        self.board.refresh(partial)
        specs: dict[str, ListenSpec] = {}
        failures: dict[str, str] = {}
        for endpoint in endpoints.values():
            url = endpoint.target.url
            decision = decisions.get(url, (1, False))
            if isinstance(decision, str):
                failures[url] = decision
            else:
                specs[url] = _spec(url, *decision)
        specs6 = {
            url: _spec6(spec)
            for url, spec in specs.items()
            if spec.virtual and url in ipv6
        }
        self.plan = Plan(specs, failures, specs6=specs6)
        self.board.reconciled(self.endpoints, self.skipped, self.plan)
        self.board.refresh(partial)
        for listeners, wanted in ((self.listeners, specs), (self.listeners6, specs6)):
            for url in [url for url in listeners if url not in wanted]:
                del listeners[url]
                self.board.listener_changed(url)
        for listeners, wanted in ((self.listeners, specs), (self.listeners6, specs6)):
            for url, spec in wanted.items():
                current = listeners.get(url)
                if current is None:
                    # An IPv6 listener shares its endpoint's counts.
                    stats = self.listeners[url].stats if wanted is specs6 else None
                    listeners[url] = FakeListener(spec, stats=stats or EndpointStats())
                elif current.spec.bind != spec.bind:
                    listeners[url] = FakeListener(spec, stats=current.stats)
                elif current.spec == spec:
                    continue
                else:
                    current.spec = spec
                self.board.listener_changed(url)
        self.board.refresh()

    def _listener(self, data: st.DataObject) -> tuple[str, FakeListener]:
        url = data.draw(st.sampled_from(sorted(self.listeners)))
        return url, self.listeners[url]

    @precondition(lambda self: self.listeners)
    @rule(data=st.data(), works=st.booleans())
    def bind(self, data: st.DataObject, works: bool) -> None:
        url, listener = self._listener(data)
        listener.listening = works
        listener.error = "" if works else f"{listener.spec.port} is in use"
        self.board.listener_changed(url)

    @precondition(lambda self: self.listeners6)
    @rule(data=st.data(), works=st.booleans())
    def bind6(self, data: st.DataObject, works: bool) -> None:
        url = data.draw(st.sampled_from(sorted(self.listeners6)))
        listener = self.listeners6[url]
        listener.listening = works
        listener.error = "" if works else f"[{listener.spec.address}] is missing"
        self.board.listener_changed(url)

    @rule(
        unnamed=st.dictionaries(
            st.sampled_from([parse_endpoint_url(url).host for url in URLS]),
            st.sampled_from(["no name reaches it", "nor this one"]),
        )
    )
    def names(self, unnamed: dict[str, str]) -> None:
        """
        As the daemon says, once the names are served, which hostnames
        cannot be reached by name; the rows change as a reconcile's do.
        """
        self.unnamed = unnamed
        self.board.named(dict(unnamed))
        self.board.refresh()

    @precondition(lambda self: self.listeners)
    @rule(data=st.data())
    def open(self, data: st.DataObject) -> None:
        url, listener = self._listener(data)
        listener.stats.connections_open += 1
        listener.stats.connections_total += 1
        self.board.listener_changed(url)

    @precondition(lambda self: self.listeners)
    @rule(data=st.data(), works=st.booleans())
    def upstream(self, data: st.DataObject, works: bool) -> None:
        url, listener = self._listener(data)
        if works:
            listener.stats.last_error = ""
        else:
            listener.stats.errors += 1
            listener.stats.last_error = "ERR_NGROK_3200: offline"
        self.board.listener_changed(url)

    @precondition(
        lambda self: any(x.stats.connections_open for x in self.listeners.values())
    )
    @rule(data=st.data(), up=st.integers(0, 10**6), down=st.integers(0, 10**6))
    def close(self, data: st.DataObject, up: int, down: int) -> None:
        url = data.draw(
            st.sampled_from(
                sorted(u for u, x in self.listeners.items() if x.stats.connections_open)
            )
        )
        stats = self.listeners[url].stats
        stats.connections_open -= 1
        stats.bytes_up += up
        stats.bytes_down += down
        self.board.listener_changed(url)

    @rule(problem=st.sampled_from(["", "the client certificate has expired"]))
    def certificate(self, problem: str) -> None:
        self.problem = problem

    @rule(stale=st.booleans())
    def kept_list(self, stale: bool) -> None:
        self.stale = stale

    @invariant()
    def same_as_rebuilt(self) -> None:
        rebuilt = endpoint_status(
            self.endpoints,
            self.skipped,
            self.plan,
            self.listeners,
            certificate_problem=self.problem,
            stale=self.stale,
            unnamed=self.unnamed,
            listeners6=self.listeners6,
        )
        board = self.board
        assert board.pending == 0
        assert board.rows() == rebuilt, (board.rows(), rebuilt)
        assert [board.row(row.id) for row in rebuilt] == list(rebuilt)
        for state in (LISTENING, STARTING, FAILED):
            wanted = [(r.url, r.id) for r in rebuilt if r.state == state]
            assert list(board.keys(state)) == wanted
            assert board.count(state) == len(wanted)
        specs = self.plan.specs
        assert board.listeners_up == sum(
            1
            for url in specs
            if url in self.listeners and self.listeners[url].listening
        )
        assert board.listeners6_up == sum(
            1
            for url in self.plan.specs6
            if url in self.listeners6 and self.listeners6[url].listening
        )
        assert board.virtual == sum(1 for spec in specs.values() if spec.virtual)
        for text in ("db1", "EP_1", "127.0.0.1:", "web"):
            assert board.matching(text) == _scan(rebuilt, text)
            assert board.matching(text, FAILED) == _scan(rebuilt, text, FAILED)


def _scan(rows: Any, text: str, state: str = "") -> list[tuple[str, str]]:
    needle = text.lower()
    return [
        (row.url, row.id)
        for row in rows
        if (not state or row.state == state)
        and (
            needle in row.url.lower()
            or needle in row.id.lower()
            or needle in row.client_address.lower()
        )
    ]


class KeptRowsTests(SynchronousTestCase):
    """
    L{StatusBoard} after random changes: equal to the full rebuild.
    """

    def test_sameAsRebuilt(self) -> None:
        """
        After every kind of change, in any order, the kept rows, their
        indexes and the counts are those a full rebuild gives.
        """
        run_state_machine_as_test(
            BoardMachine,
            settings=settings(max_examples=150, stateful_step_count=30),
        )


class WatchTests(SynchronousTestCase):
    """
    Readers learn what changed, and only that.
    """

    def test_changedOnly(self) -> None:
        """
        A reconcile that changes nothing makes no row and tells no watcher;
        one endpoint's change tells its id alone, and counts one version.
        """
        listeners: dict[str, FakeListener] = {}
        board = StatusBoard(lambda: listeners)
        seen: list[str] = []
        board.watch(seen.append)
        endpoints = {
            id: BoundEndpoint(id, url, parse_endpoint_url(url))
            for id, url in [("a", URLS[0]), ("b", URLS[1])]
        }
        specs = {URLS[0]: _spec(URLS[0], 1, False), URLS[1]: _spec(URLS[1], 2, False)}
        board.reconciled(endpoints, {}, Plan(specs, {}))
        board.refresh()
        self.assertEqual(sorted(seen), ["a", "b"])
        version = board.version
        del seen[:]
        board.reconciled(dict(endpoints), {}, Plan(dict(specs), {}))
        self.assertEqual(board.pending, 0)
        board.refresh()
        self.assertEqual((seen, board.version), ([], version))
        listeners[URLS[1]] = FakeListener(specs[URLS[1]], listening=True)
        board.listener_changed(URLS[1])
        self.assertEqual((seen, board.version), (["b"], version + 1))
        self.assertEqual(board.listeners_up, 1)


class RowIndexTests(SynchronousTestCase):
    """
    L{RowIndex}: the orders and the search stay right as rows change.
    """

    def test_putAndRemove(self) -> None:
        """
        A row that changes its URL or state moves in the orders; a removed
        row leaves them and the search.
        """
        a = EndpointStatus("a", "tcp://b.x:1", "", STARTING, "")
        b = EndpointStatus("b", "tcp://a.x:1", "", STARTING, "")
        index = RowIndex.of([a, b])
        self.assertEqual(
            list(index.keys()), [("tcp://a.x:1", "b"), ("tcp://b.x:1", "a")]
        )
        self.assertTrue(index.put(EndpointStatus("a", "tcp://0.x:1", "", FAILED, "")))
        self.assertFalse(index.put(EndpointStatus("a", "tcp://0.x:1", "", FAILED, "")))
        self.assertEqual([k[1] for k in index.keys()], ["a", "b"])
        self.assertEqual(list(index.keys(FAILED)), [("tcp://0.x:1", "a")])
        self.assertEqual(index.matching("B.X"), [])
        self.assertEqual(index.matching("A.X"), [("tcp://a.x:1", "b")])
        self.assertTrue(index.remove("b"))
        self.assertEqual(index.matching("x:1"), [("tcp://0.x:1", "a")])
        self.assertEqual(index.matching("x\x00"), [])


def rebuilt(daemon: Daemon) -> tuple[EndpointStatus, ...]:
    """
    The rows a full rebuild of C{daemon}'s state gives now.
    """
    problem, stale = daemon._overlay()
    return endpoint_status(
        daemon.endpoints,
        daemon.skipped,
        daemon.plan,
        daemon.listeners.listeners,
        certificate_problem=problem,
        stale=stale,
        unnamed=daemon.names.unnamed(list(daemon.plan.virtual_names())),
        listeners6=daemon.listeners.listeners6,
    )


class DaemonKeepsRowsTests(DaemonHealthTestCase):
    """
    A daemon's kept rows, after real binds and real connections through the
    devcloud, are the rows a full rebuild gives.
    """

    endpoints = [ECHO, OTHER]

    def test_bindsAndConnections(self) -> Deferred[None]:
        """
        A port in use fails its endpoint and a later poll recovers it; a
        connection open, its bytes once closed, one the ingress refuses: the
        kept rows follow each, as the data path counts them.
        """

        async def run() -> None:
            # The first port the daemon gives out is taken.
            holder = socket.socket()
            holder.bind(("127.0.0.1", self.start_port))
            holder.listen(1)
            daemon = await self.start(listening=1)
            await wait_until(lambda: daemon.board.count(FAILED) == 1, "a failure")
            self.assertEqual(daemon.endpoint_status(), rebuilt(daemon))
            holder.close()
            daemon.discovery.poll_now()
            await wait_until(lambda: daemon.board.count(LISTENING) == 2, "recovery")
            self.assertEqual(daemon.endpoint_status(), rebuilt(daemon))

            client = Recorder()
            await connect(self.port_of(daemon, ECHO), client)
            client.transport.write(b"z" * 3000)
            await wait_until(lambda: len(client.received) == 3000, "the echo")
            self.assertEqual(daemon.endpoint_status(), rebuilt(daemon))
            (row,) = [r for r in daemon.endpoint_status() if r.url == ECHO]
            self.assertEqual((row.connections_open, row.connections_total), (1, 1))
            client.transport.loseConnection()
            await wait_until(
                lambda: daemon.board.row(row.id) != row, "the close counted"
            )
            self.assertEqual(daemon.endpoint_status(), rebuilt(daemon))
            closed = daemon.board.row(row.id)
            assert closed is not None
            self.assertEqual((closed.bytes_up, closed.bytes_down), (3000, 3000))

            self.devcloud.cloud.remove_endpoint(OTHER)
            refused = Recorder()
            await connect(self.port_of(daemon, OTHER), refused)
            await refused.lost
            await wait_until(
                lambda: (
                    daemon.board.count(FAILED) == 0
                    and any(r.errors for r in daemon.endpoint_status())
                ),
                "the refusal counted",
            )
            self.assertEqual(daemon.endpoint_status(), rebuilt(daemon))

        return ensureDeferred(run())
