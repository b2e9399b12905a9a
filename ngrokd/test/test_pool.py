"""
Tests for L{ngrokd.datapath.pool}: how many warm connections are kept, for
how long, and what happens when they fail; over real TLS with the devcloud's
ingress, and with a fake clock for timing.
"""

from __future__ import annotations

import attrs
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.datapath import wire
from ngrokd.datapath.bridge import BridgeFactory
from ngrokd.datapath.pool import (
    FIRST_HANDSHAKE_GUESS,
    FLOOR_MIN_HANDSHAKE,
    IDLE_LIFE_HALF_LIFE,
    IDLE_LIFE_MARGIN,
    MIN_IDLE_LIFE,
    STORM_PAUSE,
    STORM_SLACK,
    AcceptRate,
    PoolSettings,
    Shortfall,
    WarmPool,
    pool_target,
)
from ngrokd.datapath.resumption import HandshakeCounts
from ngrokd.datapath.upgrade import IngressProtocol, UpgradeFailed
from ngrokd.devcloud.ingress import IngressFault
from ngrokd.devcloud.ingress import IngressProtocol as ServerSide
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    connect,
    devcloud_ingress,
    exchange,
    listen,
    wait_until,
)

POOL = PoolSettings(size=4, idle_timeout=30.0, max_age=20.0, linger=120.0)
ECHO = "tcp://echo.test:7"
REQUEST = wire.ConnRequest("echo.test", 7)


class TargetTests(SynchronousTestCase):
    """
    L{pool_target} follows the accept rate and the handshake time.
    """

    def test_sparseAccepts(self) -> None:
        """
        A connection now and then keeps one ready.
        """
        self.assertEqual(pool_target(0.0, 0.01, 16), 1)
        self.assertEqual(pool_target(0.1, 0.01, 16), 1)

    def test_followsRateAndHandshake(self) -> None:
        """
        Twice what one handshake's time of accepts would take, plus one.
        """
        self.assertEqual(pool_target(300.0, 0.01, 16), 7)
        self.assertEqual(pool_target(300.0, 0.02, 16), 13)

    def test_bounded(self) -> None:
        """
        Never more than the size; a size of 0 keeps none.
        """
        self.assertEqual(pool_target(5000.0, 0.01, 16), 16)
        self.assertEqual(pool_target(5000.0, 0.01, 0), 0)


class ShortfallTests(SynchronousTestCase):
    """
    L{Shortfall} asks for one more warm connection for each accept that
    found none while a taken one was being replaced, and gives them back.
    """

    def test_missWhileReplacing(self) -> None:
        """
        Only a miss while a taken connection is being replaced counts (not
        one while an expired one is, nor the first accept's), up to the
        pool's size.
        """
        short = Shortfall()
        short.taken(found=False, ready=0, replacing=False, size=2)
        self.assertEqual(short.more, 0)
        for _ in range(3):
            short.taken(found=False, ready=0, replacing=True, size=2)
        self.assertEqual(short.more, 2)

    def test_surplusGivesBack(self) -> None:
        """
        An accept that leaves more than one ready gives one back; one that
        leaves one keeps them.
        """
        short = Shortfall(more=2)
        short.taken(found=True, ready=1, replacing=True, size=16)
        self.assertEqual(short.more, 2)
        short.taken(found=True, ready=2, replacing=False, size=16)
        short.taken(found=True, ready=2, replacing=False, size=16)
        short.taken(found=True, ready=2, replacing=False, size=16)
        self.assertEqual(short.more, 0)


class Member:
    """
    A stand-in warm connection.
    """

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.was_closed = False

    def close(self) -> None:
        self.was_closed = True
        self.closed.callback(None)

    def lost(self) -> None:
        """
        The far side closed it.
        """
        self.closed.callback(None)


class PoolTimingTests(SynchronousTestCase):
    """
    The pool's decisions over time, with a fake clock and fake dials.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dials: list[Deferred[Member]] = []
        self.may_dial = True
        self.cancelled: list[Deferred[Member]] = []
        self.pool: WarmPool[Member] = WarmPool(self.clock, self.dial, POOL)

    def dial(self) -> Deferred[Member] | None:
        if not self.may_dial:
            return None
        dialing: Deferred[Member] = Deferred(self.cancelled.append)
        self.dials.append(dialing)
        return dialing

    def accept(self) -> Member | None:
        """
        An accepted connection: it takes a warm connection if one is ready,
        and its upgrade succeeds.
        """
        taken = self.pool.take()
        self.pool.answered()
        return taken

    def complete(self) -> list[Member]:
        """
        Finish every dial in progress.
        """
        members = []
        while self.dials:
            member = Member()
            self.dials.pop(0).callback(member)
            members.append(member)
        return members

    def test_nothingBeforeFirstAccept(self) -> None:
        """
        A pool that never saw a connection dials nothing, however long.
        """
        self.clock.advance(3600)
        self.assertEqual((self.pool.ready, self.pool.dialing, self.dials), (0, 0, []))

    def test_firstAcceptDialsOne(self) -> None:
        """
        The first accepted connection finds nothing ready and starts one
        warm dial at once, not after its answer: the next connection takes
        it. Connections that come meanwhile dial no more.
        """
        self.assertIsNone(self.pool.take())
        self.assertEqual(len(self.dials), 1)
        self.assertIsNone(self.pool.take())
        self.assertEqual(len(self.dials), 1)
        (member,) = self.complete()
        self.assertEqual(self.pool.ready, 1)
        self.clock.advance(1)
        self.assertIs(self.accept(), member)

    def test_brokenIngressNotDialledInALoop(self) -> None:
        """
        Once a warm dial has failed, accepted connections dial no warm one
        until the ingress answers a request again.
        """
        self.pool.take()
        self.dials.pop().errback(UpgradeFailed("refused"))
        for _ in range(10):
            self.clock.advance(1)
            self.assertIsNone(self.pool.take())
        self.assertEqual(self.dials, [])
        self.pool.answered()
        self.assertEqual(len(self.dials), 1)
        self.flushLoggedErrors(UpgradeFailed)

    def test_growsWithRate(self) -> None:
        """
        A high accept rate makes the pool dial more, up to its size.
        """
        self.pool.handshake_took(1.0)
        for _ in range(100):
            self.accept()
        self.assertEqual(len(self.dials), POOL.size)

    def idle_until(self, when: float) -> list[Member]:
        """
        Let the clock run to C{when} with no accept, completing every dial
        at once; the connections dialled.
        """
        dialled = []
        while self.clock.seconds() < when:
            dialled += self.complete()
            self.clock.advance(min(1.0, when - self.clock.seconds()))
        return dialled + self.complete()

    def test_floorUntilLinger(self) -> None:
        """
        After the idle timeout the pool keeps one connection ready (the
        floor), replaced when it is too old, until the linger is over;
        then none, and nothing is dialled.
        """
        for _ in range(20):
            self.clock.advance(0.1)
            self.accept()
        self.assertGreater(len(self.complete()), 1)
        last = self.clock.seconds()
        self.idle_until(last + POOL.idle_timeout + 1)
        self.assertEqual(self.pool.ready, 1)
        dialled = self.idle_until(last + POOL.linger - 1)
        self.assertEqual(self.pool.ready, 1)
        self.assertGreater(len(dialled), 1)  # replaced as it aged
        self.clock.advance(1)
        self.assertEqual((self.pool.ready, self.dials), (0, []))
        self.assertTrue(all(member.was_closed for member in dialled))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noFloorWhenHandshakesAreQuick(self) -> None:
        """
        Where a handshake takes less than L{FLOOR_MIN_HANDSHAKE} (the
        ingress on loopback), the pool keeps nothing past the idle timeout:
        a floor would save nothing a client could tell.
        """
        for _ in range(50):
            self.pool.handshake_took(FLOOR_MIN_HANDSHAKE / 2)
        self.accept()
        self.idle_until(POOL.idle_timeout - 1)
        self.assertEqual(self.pool.ready, 1)
        self.clock.advance(1)
        self.assertEqual((self.pool.ready, self.dials), (0, []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shorterLingerEndsTheFloor(self) -> None:
        """
        A linger made shorter than the time since the last accept closes
        the floor at once.
        """
        self.accept()
        self.idle_until(POOL.idle_timeout + 10)
        self.assertEqual(self.pool.ready, 1)
        self.pool.configure(attrs.evolve(POOL, linger=POOL.idle_timeout + 5))
        self.assertEqual((self.pool.ready, self.dials), (0, []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acceptsPostponeDraining(self) -> None:
        """
        Each accept restarts the quiet period.
        """
        self.accept()
        self.complete()
        self.clock.advance(POOL.idle_timeout - 1)
        self.accept()
        self.complete()
        self.clock.advance(POOL.idle_timeout - 1)
        self.assertEqual(self.pool.ready + self.pool.dialing, 1)

    def test_maxAge(self) -> None:
        """
        A ready connection unused for the maximum age is closed and
        replaced while connections keep coming.
        """
        self.accept()
        (old,) = self.complete()
        self.clock.advance(POOL.max_age - 5)
        self.accept()  # takes old
        (member,) = self.complete()
        self.clock.advance(POOL.max_age)
        self.assertTrue(member.was_closed)
        self.assertEqual(len(self.dials), 1)
        self.assertFalse(old.was_closed)

    def test_lostWhileIdleLearnsAndPauses(self) -> None:
        """
        A ready connection the far side closes is dropped; later ones are
        replaced at a margin inside the life it had, and none are dialled
        until the ingress answers a request again.
        """
        self.accept()
        (member,) = self.complete()
        self.clock.advance(8)
        member.lost()
        self.assertEqual((self.pool.ready, self.pool.lost), (0, 1))
        self.assertEqual(self.pool.max_age, 8 * IDLE_LIFE_MARGIN)
        self.pool.take()
        self.assertEqual(self.dials, [])
        self.pool.answered()
        (fresh,) = self.complete()
        self.clock.advance(8 * IDLE_LIFE_MARGIN)
        self.assertTrue(fresh.was_closed)

    def test_lossYoungerThanHandshakeTeachesNothing(self) -> None:
        """
        A ready connection closed as soon as it was made (the ingress
        restarting) says nothing of the ingress's idle timeout: the next
        ones keep the maximum age.
        """
        self.accept()
        (member,) = self.complete()
        member.lost()
        self.assertEqual(self.pool.max_age, POOL.max_age)

    def test_learnedLifeHasAFloor(self) -> None:
        """
        However soon the ingress closes an idle connection, the pool keeps
        its connections at least L{MIN_IDLE_LIFE} times the margin: it
        never replaces them as fast as it can dial.
        """
        self.accept()
        (member,) = self.complete()
        self.clock.advance(0.3)
        member.lost()
        self.assertEqual(self.pool.max_age, MIN_IDLE_LIFE * IDLE_LIFE_MARGIN)

    def test_learnedLifeRecovers(self) -> None:
        """
        A learned life drifts back to the maximum age: half way every
        L{IDLE_LIFE_HALF_LIFE} seconds.
        """
        self.accept()
        (member,) = self.complete()
        self.clock.advance(8)
        member.lost()
        self.assertEqual(self.pool.max_age, 8 * IDLE_LIFE_MARGIN)
        self.clock.advance(IDLE_LIFE_HALF_LIFE)
        self.assertEqual(self.pool.max_age, 20 - (20 - 6) / 2)
        self.clock.advance(20 * IDLE_LIFE_HALF_LIFE)
        self.assertAlmostEqual(self.pool.max_age, POOL.max_age, places=3)

    def test_stormOfDiscardsStopsThePoolAndIsSaidOnce(self) -> None:
        """
        When the ingress closes every warm connection before it is taken,
        each accepted connection would cost two handshakes: once more of
        them are discarded than taken, by more than the pool's size and
        L{STORM_SLACK}, the pool dials none for L{STORM_PAUSE} seconds,
        says so in one line, and no more when it happens again.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)

        def storm() -> int:
            dialled = 0
            for _ in range(50):  # five seconds
                self.clock.advance(0.1)
                self.accept()
                for member in self.complete():
                    dialled += 1
                    member.lost()
            return dialled

        self.assertEqual(storm(), POOL.size + STORM_SLACK + 1)
        for _ in range(int(STORM_PAUSE / 5) - 1):
            self.assertEqual(storm(), 0)
        self.assertEqual(storm() + storm(), POOL.size + STORM_SLACK + 1)
        self.assertEqual(storm(), 0)
        said = [e for e in events if e.get("pause") == STORM_PAUSE]
        self.assertEqual(len(said), 1)

    def test_busyDialsNothing(self) -> None:
        """
        While no dial may start, the pool dials nothing and waits for the
        next accept.
        """
        self.may_dial = False
        self.accept()
        self.assertEqual(self.pool.dialing, 0)
        self.may_dial = True
        self.accept()
        self.assertEqual(self.pool.dialing, 1)

    def test_resetDropsReadyConnections(self) -> None:
        """
        After a reset (a new certificate), ready connections are closed and
        new ones are dialled.
        """
        self.accept()
        (ready,) = self.complete()
        self.pool.reset()
        self.assertTrue(ready.was_closed)
        (fresh,) = self.complete()
        self.assertEqual(self.pool.ready, 1)
        self.assertIs(self.accept(), fresh)

    def test_resetDropsConnectionsBeingDialled(self) -> None:
        """
        A connection being dialled when the pool is reset is closed when it
        completes, and a new one is dialled.
        """
        self.accept()
        in_flight = self.dials.pop()
        self.pool.reset()
        stale = Member()
        in_flight.callback(stale)
        self.assertTrue(stale.was_closed)
        (fresh,) = self.complete()
        self.assertIs(self.accept(), fresh)

    def test_shrink(self) -> None:
        """
        A smaller size closes the extra ready connections; size 0 keeps none
        and dials none.
        """
        self.pool.handshake_took(1.0)
        for _ in range(100):
            self.accept()
        members = self.complete()
        self.pool.configure(PoolSettings(size=1))
        self.assertEqual(sum(not m.was_closed for m in members), 1)
        self.pool.configure(PoolSettings(size=0))
        self.assertTrue(all(m.was_closed for m in members))
        self.assertIsNone(self.accept())
        self.assertEqual(self.dials, [])

    def test_stop(self) -> None:
        """
        Stopping closes the ready connections and leaves no timer.
        """
        self.accept()
        (member,) = self.complete()
        self.pool.stop()
        self.assertTrue(member.was_closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.accept())
        self.assertEqual(self.dials, [])

    def test_stopCancelsDials(self) -> None:
        """
        Stopping cancels the dials in progress.
        """
        self.accept()
        (dialing,) = self.dials
        self.pool.stop()
        self.assertEqual(self.cancelled, [dialing])
        self.assertEqual(self.pool.dialing, 0)

    def test_sizedForTheAnswersWait(self) -> None:
        """
        A taken connection is replaced once its answer has come: the longer
        answers take, the more connections are kept for those that come
        meanwhile.
        """
        for _ in range(5):
            self.clock.advance(0.2)
            self.pool.take()
        self.pool.answered()
        self.assertEqual(len(self.dials), 1)
        self.pool.answered(waited=1.0)
        self.assertEqual(len(self.dials), 3)

    def test_clientThatComesRightBack(self) -> None:
        """
        A client that opens its next connection as soon as its last one is
        answered comes before the connection it took is replaced: after the
        first time it finds none ready, the pool keeps one more, and it
        finds one ready from then on, even at a rate the pool's average
        does not show yet.
        """
        for _ in range(20):
            self.pool.handshake_took(0.0025)
        self.accept()
        self.complete()
        self.clock.advance(5)
        found = []
        for _ in range(50):
            under_way = list(self.dials)
            self.clock.advance(0.003)
            found.append(self.pool.take() is not None)
            for dialing in under_way:  # done just after the client came back
                self.dials.remove(dialing)
                dialing.callback(Member())
            self.clock.advance(0.001)
            self.pool.answered(waited=0.001)
        self.assertEqual(found[:2], [True, False])
        self.assertEqual(found[2:], [True] * 48)
        # A quiet period forgets it: the next client starts from the rate.
        self.complete()
        self.clock.advance(POOL.linger)
        self.accept()
        self.complete()
        self.assertEqual(self.pool.ready, 1)

    def test_handshakeEstimate(self) -> None:
        """
        Measured handshake times move the estimate from its first guess:
        slower handshakes keep more ready.
        """
        for _ in range(5):
            self.clock.advance(0.2)
            self.accept()
        self.assertEqual(len(self.dials), pool_target(5.0, FIRST_HANDSHAKE_GUESS, 4))
        self.pool.handshake_took(1.0)
        self.complete()
        self.clock.advance(0.2)
        self.accept()
        self.assertEqual(self.pool.ready + self.pool.dialing, 3)


class AcceptRateTests(SynchronousTestCase):
    """
    L{AcceptRate} is right from the first second and forgets old accepts.
    """

    def test_firstSecond(self) -> None:
        """
        Twenty accepts in the first half second are twenty a second, not
        two: the window is not yet full.
        """
        rate = AcceptRate()
        for n in range(20):
            rate.accepted(100.0 + n / 40)
        self.assertEqual(rate.per_second(100.5), 20.0)

    def test_steady(self) -> None:
        """
        Five a second for twenty seconds are five a second; ten seconds
        after they stop, none.
        """
        rate = AcceptRate()
        for n in range(100):
            rate.accepted(100.0 + n / 5)
        # The second now beginning has none yet: nine seconds of five.
        self.assertEqual(rate.per_second(120.0), 4.5)
        self.assertEqual(rate.per_second(131.0), 0.0)


class PoolOverTLSTests(TestCase):
    """
    The warm pool against the devcloud's ingress over real mutual TLS.
    """

    timeout = 30

    def setUp(self) -> None:
        self.harness = devcloud_ingress(self, pool=POOL)
        self.connector = self.harness.connector
        self.pool = self.connector.pool
        self.ingress = self.harness.ingress
        port = listen(Factory.forProtocol(Echo), self)
        self.harness.cloud.add_endpoint(ECHO, ("127.0.0.1", port))

    def warm(self) -> list[ServerSide]:
        """
        The ingress's connections that have not sent a request.
        """
        return [p for p in self.ingress.active if p.request is None]

    async def upgrade(self) -> IngressProtocol:
        upgraded = await self.connector.connect(REQUEST)
        self.addCleanup(_abort, upgraded)
        assert upgraded.response is not None
        self.assertFalse(upgraded.response.refused)
        return upgraded

    async def warmed(self) -> ServerSide:
        """
        Upgrade one connection, and wait for the warm one it makes.
        """
        await self.upgrade()
        await wait_until(lambda: self.pool.ready == 1, "a warm connection")
        (warm,) = self.warm()
        return warm

    def test_secondConnectionTakesWarm(self) -> Deferred[None]:
        """
        The first connection is dialled in full and makes the pool dial a
        warm one; the next takes it, and the endpoint answers on it.
        """

        async def run() -> None:
            await self.warmed()
            await self.upgrade()
            self.assertEqual(
                self.connector.handshakes, HandshakeCounts(full=1, pooled=1)
            )
            self.assertEqual(self.ingress.requests_total, 2)

        return ensureDeferred(run())

    def test_replacedOnceTheCallerHasIt(self) -> Deferred[None]:
        """
        The warm connection taken is replaced only once the caller has it
        (and its client's first bytes went on): the replacement's dial
        does not come first.
        """

        async def run() -> None:
            await self.warmed()
            dialing_when_handed: list[int] = []

            def handed(upgraded: IngressProtocol) -> IngressProtocol:
                dialing_when_handed.append(self.pool.dialing)
                return upgraded

            upgraded = await self.connector.connect(REQUEST).addCallback(handed)
            self.addCleanup(_abort, upgraded)
            self.assertEqual(self.connector.handshakes.pooled, 1)
            self.assertEqual(dialing_when_handed, [0])
            self.assertGreaterEqual(self.pool.dialing + self.pool.ready, 1)

        return ensureDeferred(run())

    def test_idleClientClosesItsLastAfterLinger(self) -> Deferred[None]:
        """
        An idle client keeps its last warm connection past the idle
        timeout, and closes it once the linger is over: then the ingress
        holds no connection from it.
        """

        async def run() -> None:
            linger = 1.0
            settings = PoolSettings(4, idle_timeout=0.1, linger=linger)
            self.pool.configure(attrs.evolve(settings, floor_handshake=0.0))
            accepted = reactor.seconds()
            carrying = await self.upgrade()
            carrying.transport.abortConnection()
            await wait_until(lambda: self.pool.ready == 1, "a warm connection")
            (warm,) = self.warm()
            await wait_until(lambda: not self.ingress.active, "no connection")
            self.assertTrue(warm.closed.called)
            self.assertGreaterEqual(reactor.seconds() - accepted, linger)
            self.assertEqual((self.pool.ready, self.pool.dialing), (0, 0))

        return ensureDeferred(run())

    def test_ingressClosesIdle(self) -> Deferred[None]:
        """
        When the ingress closes unused connections sooner than the maximum
        age, the pool notices, replaces later ones before that, and the next
        connection is carried all the same.
        """

        async def run() -> None:
            self.ingress.request_timeout = 1.2
            await self.warmed()
            await wait_until(lambda: self.pool.lost == 1, "the ingress's close")
            self.assertLess(self.pool.max_age, 1.2)
            await self.upgrade()
            await wait_until(lambda: self.pool.ready == 1, "a new warm one")
            await wait_until(lambda: self.pool.retired == 1, "replaced in time")
            self.assertEqual(self.pool.lost, 1)

        return ensureDeferred(run())

    def test_ingressRestartUnderLoad(self) -> Deferred[None]:
        """
        An ingress restarted (as a deploy does) just after the pool dialled
        a warm connection closes it at once: the pool does not learn from
        that a life of nothing, and the connections that follow, paced,
        cost the ingress at most two handshakes each, not a storm of
        warm connections dialled and discarded.
        """

        async def run() -> None:
            bridge = BridgeFactory(parse_endpoint_url(ECHO), self.connector, None)
            port = listen(bridge, self)
            await self.carried(port)
            await wait_until(lambda: self.pool.ready == 1, "a warm connection")
            await self.harness.restart()
            before = self.ingress.handshakes_total
            clients = 10
            for _ in range(clients):
                await self.carried(port)
                await deferLater(reactor, 0.2, lambda: None)
            spent = self.ingress.handshakes_total - before
            self.assertLessEqual(spent, 2 * clients)

        return ensureDeferred(run())

    async def carried(self, port: int) -> None:
        """
        One client connection through the bridge, echoed.
        """
        client = await exchange(port, b"ping")
        self.assertEqual(client.received, b"ping")

    def test_closedAsTakenIsRetried(self) -> Deferred[None]:
        """
        A warm connection the ingress closes just as it is taken fails
        before any application byte was sent: the request is made again on
        a new connection, and succeeds.
        """

        async def run() -> None:
            warm = await self.warmed()
            warm.transport.abortConnection()
            upgrading = self.connector.connect(REQUEST)  # before the close is read
            upgraded = await upgrading
            self.addCleanup(_abort, upgraded)
            self.assertEqual(self.connector.handshakes.pooled, 0)
            self.assertEqual(self.ingress.upgrades_total, 2)

        return ensureDeferred(run())

    def test_retriedOnce(self) -> Deferred[None]:
        """
        A request the ingress hangs up on, on a warm connection, is made
        once more on a new one, and no more: the failure is the caller's.
        """

        async def run() -> None:
            await self.warmed()
            self.ingress.inject(ECHO, IngressFault(hang_up=True))
            with self.assertRaises(UpgradeFailed):
                await self.connector.connect(REQUEST)
            self.assertEqual(self.ingress.requests_total, 3)

        return ensureDeferred(run())

    def test_droppedAfterEarlyDataNotRetried(self) -> Deferred[None]:
        """
        A warm connection dropped once the client's first bytes went behind
        its request is not tried again on a new one, as the ingress may have
        passed them on: the ingress sees no other request nor handshake, and
        the client is reset.
        """

        async def run() -> None:
            bridge = BridgeFactory(parse_endpoint_url(ECHO), self.connector, None)
            port = listen(bridge, self)
            await self.warmed()
            self.ingress.inject(ECHO, IngressFault(stall=True))
            client = Recorder()
            await connect(port, client)
            client.transport.write(b"ping")
            await wait_until(lambda: self.ingress.early_bytes_total == 4, "early data")
            requests = self.ingress.requests_total
            handshakes = self.ingress.handshakes_total
            (taken,) = [p for p in self.ingress.carrying if p.peer is None]
            taken.transport.abortConnection()
            await client.lost
            assert client.reason is not None
            self.assertTrue(client.reason.check(ConnectionLost), client.reason)
            self.assertEqual(bridge.stats.failures, {"upgrade": 1})
            self.assertEqual(
                (self.ingress.requests_total, self.ingress.handshakes_total),
                (requests, handshakes),
            )

        return ensureDeferred(run())

    def test_dataBeforeRequestDropsWarm(self) -> Deferred[None]:
        """
        An ingress that speaks on a warm connection before its request is
        not following the protocol: the connection is dropped, not taken.
        """

        async def run() -> None:
            warm = await self.warmed()
            warm.transport.write(b"unexpected")
            await warm.closed
            await wait_until(lambda: self.pool.lost == 1, "the warm one dropped")
            await self.upgrade()
            self.assertEqual(self.connector.handshakes.pooled, 0)

        return ensureDeferred(run())

    def test_renewalRefillsWithNewCertificate(self) -> Deferred[None]:
        """
        After a new client certificate, the warm connections made with the
        old one are closed and new ones present the new certificate.
        """

        async def run() -> None:
            old = await self.warmed()
            cert_pem, key_pem = self.harness.new_certificate()
            self.connector.use_certificate(cert_pem, key_pem)
            await old.closed
            await wait_until(lambda: len(self.warm()) == 1, "a new warm connection")
            (new,) = self.warm()
            serial = new.transport.getPeerCertificate().get_serial_number()
            self.assertEqual(serial, _serial(cert_pem))
            await self.upgrade()
            self.assertEqual(self.connector.handshakes.pooled, 1)

        return ensureDeferred(run())


def _abort(connection: IngressProtocol) -> None:
    if not connection.closed.called:
        connection.transport.abortConnection()


def _serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number
