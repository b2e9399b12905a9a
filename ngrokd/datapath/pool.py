# -*- test-case-name: ngrokd.test.test_pool -*-
"""
A warm pool of connections to the binding ingress.

A new connection to the ingress pays TCP, a TLS handshake and the upgrade
before its first byte: three round trips. The C{ConnRequest} names the
endpoint, so a connection whose TLS handshake is done and whose request is
not yet sent serves any endpoint. L{WarmPool} keeps a few of them ready, so
that an accepted connection pays only the upgrade's round trip.

How many (L{pool_demand}): while connections are being accepted, what the
recent accept rate would take while a taken connection is replaced (the
wait for the ingress's answer, as it is dialled only then, and a
handshake), twice over, plus one (L{pool_target}), and one more for each
accept that found none ready while a taken one was being replaced
(L{Shortfall}: a client that comes back as soon as it is answered), never
more than the configured size. After a quiet
period with no accepted connection, one (the floor), so that the next
connection after a pause pays no handshake, for as long as the linger; but
none where a handshake costs less than L{FLOOR_MIN_HANDSHAKE}, on loopback
or a link as short, where the floor would save nothing the client could
tell. After the linger, none, and no dials: an idle daemon holds no
connection to ngrok. A ready connection is replaced after a maximum age,
and sooner if the ingress was seen to close idle connections earlier than
that. A connection is never put back after its upgrade.

What the pool learns from the ingress's closes is bounded: a connection
closed younger than a handshake takes (an ingress restarting, a deploy)
teaches nothing, no life under L{MIN_IDLE_LIFE} is learned, and a learned
life drifts back to the maximum age (L{replacement_age}), so one bad
moment does not leave the pool replacing its connections as fast as it can
dial them.
Should the pool still discard more warm connections than are taken
(L{is_storm}), it dials none for L{STORM_PAUSE} seconds, and says so once.

A taken connection is replaced once the ingress has answered its request,
not when it is taken: a handshake started meanwhile would compete with that
request for the CPU, here and at the ingress. The exception is a pool with
nothing ready nor dialling: the accept that finds it so starts one warm
dial at once, so that the first connections after a start or a pause do not
each pay a handshake while the pool waits for an answer.

When a pooled connection is lost while it waits (the ingress closed it, or
refused the certificate after the handshake), the pool dials no more until
the ingress answers a request again: a broken ingress is not dialled in a
loop, and the connections that need it meet the failure and report it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Seconds over which the accept rate is measured.
RATE_WINDOW = 10
#: The handshake time assumed before one has been measured.
FIRST_HANDSHAKE_GUESS = 0.05
#: Weight of each new handshake (or answer) time in the running estimate.
HANDSHAKE_WEIGHT = 0.2
#: A ready connection is replaced at this fraction of the shortest idle life
#: the ingress was seen to allow.
IDLE_LIFE_MARGIN = 0.75
#: The shortest idle life the pool learns, in seconds.
MIN_IDLE_LIFE = 1.0
#: Seconds in which a learned idle life gets half way back to the maximum age.
IDLE_LIFE_HALF_LIFE = 60.0
#: Seconds over which warm connections discarded unused are counted.
STORM_WINDOW = 10.0
#: Discards beyond the taken ones and the pool's size that make a storm.
STORM_SLACK = 10
#: Seconds the pool dials nothing after a storm of discards.
STORM_PAUSE = 60.0
#: The shortest handshake (TCP and TLS, measured) worth keeping a warm
#: connection for through a quiet period: on loopback one takes a few
#: milliseconds of CPU, across a link at least two round trips.
FLOOR_MIN_HANDSHAKE = 0.005


@frozen
class PoolSettings:
    """
    How the pool is sized and how long its connections live.
    """

    #: The most connections held ready; 0 turns the pool off.
    size: int = 16
    #: Seconds without an accepted connection after which the pool keeps
    #: at most its floor of one.
    idle_timeout: float = 30.0
    #: Seconds a ready connection is kept before it is replaced.
    max_age: float = 20.0
    #: Seconds without an accepted connection after which the floor goes too.
    linger: float = 300.0
    #: The handshake time (seconds) under which no floor is kept.
    floor_handshake: float = FLOOR_MIN_HANDSHAKE


#: No pool: every connection is dialled when it is accepted.
NO_POOL = PoolSettings(size=0)


def pool_target(accepts_per_second: float, handshake_seconds: float, size: int) -> int:
    """
    How many connections to hold ready while connections are being accepted:
    what the accepts of one handshake's time would take, twice over, plus
    one; at most C{size}.
    """
    if size <= 0:
        return 0
    return min(size, 1 + math.floor(2 * accepts_per_second * handshake_seconds))


def pool_demand(
    idle: float | None,
    accepts_per_second: float,
    handshake_seconds: float,
    answer_seconds: float,
    settings: PoolSettings,
    short: int = 0,
) -> int:
    """
    How many connections to hold ready C{idle} seconds after the last
    accepted connection (C{None}: none yet): L{pool_target} for a
    replacement's time (C{answer_seconds}, then a handshake) while
    connections come, and C{short} more (L{Shortfall}), then the floor of
    one until the linger is over, where a handshake costs enough to be
    worth saving; else none.
    """
    if idle is None:
        return 0
    if idle < settings.idle_timeout:
        replacing = answer_seconds + handshake_seconds
        target = pool_target(accepts_per_second, replacing, settings.size)
        return min(settings.size, target + short) if target else 0
    if idle < settings.linger and handshake_seconds >= settings.floor_handshake:
        return min(1, settings.size)
    return 0


def replacement_age(learned: float, elapsed: float, max_age: float) -> float:
    """
    After how long a ready connection is replaced, C{elapsed} seconds after
    the ingress was seen to allow an idle life of only C{learned} (taken as
    at least L{MIN_IDLE_LIFE}): L{IDLE_LIFE_MARGIN} of that life at first,
    then half way back to C{max_age} every L{IDLE_LIFE_HALF_LIFE} seconds,
    as the close seen may have been a passing one.
    """
    age = max(learned, MIN_IDLE_LIFE) * IDLE_LIFE_MARGIN
    if age >= max_age:
        return max_age
    return max_age - (max_age - age) * math.pow(0.5, elapsed / IDLE_LIFE_HALF_LIFE)


def is_storm(discarded: int, taken: int, size: int) -> bool:
    """
    Whether C{discarded} warm connections closed unused, against C{taken}
    ones used, in one L{STORM_WINDOW}, are the pool dialling for nothing:
    more than one pool's worth and L{STORM_SLACK} beyond those taken.
    """
    return discarded - taken > size + STORM_SLACK


@define
class DiscardCount:
    """
    Warm connections discarded unused and taken, in windows of
    L{STORM_WINDOW} seconds.
    """

    discarded: int = 0
    taken: int = 0
    _since: float | None = None

    def _window(self, now: float) -> None:
        if self._since is None or now - self._since >= STORM_WINDOW:
            self._since, self.discarded, self.taken = now, 0, 0

    def discard(self, now: float) -> None:
        self._window(now)
        self.discarded += 1

    def take(self, now: float) -> None:
        self._window(now)
        self.taken += 1

    def clear(self) -> None:
        self._since, self.discarded, self.taken = None, 0, 0


@define
class Shortfall:
    """
    How many more connections to hold ready than the accept rate says.

    Connections do not come evenly: a client that opens its next connection
    as soon as its last one is answered comes for a warm connection right
    after it took one, before that one is replaced (it is dialled once the
    ingress answers), whatever the rate says. An accept that finds none
    ready while a taken one is being replaced asks for one more (up to the
    pool's size); one that leaves more than one ready, for one fewer; a
    quiet period forgets them.
    """

    more: int = 0

    def taken(self, found: bool, ready: int, replacing: bool, size: int) -> None:
        """
        An accept C{found} a connection ready or not, and left C{ready};
        whether a taken one was C{replacing} (being dialled).
        """
        if not found and replacing:
            self.more = min(self.more + 1, size)
        elif ready > 1 and self.more:
            self.more -= 1


@define
class AcceptRate:
    """
    Accepts per second over the last L{RATE_WINDOW} seconds, counted in
    one-second buckets so that a burst of thousands costs no more than one.
    Until accepts have come for a whole window, the rate is over the time
    since they began (at least a second), so that it is right from the
    first second, not a tenth of itself.
    """

    _buckets: list[int] = field(factory=lambda: [0] * RATE_WINDOW)
    _second: int = 0
    #: When the last accept was seen.
    last: float | None = None
    #: When the accepts now counted began.
    _since: float = 0.0

    def _advance(self, now: float) -> None:
        second = int(now)
        gap = second - self._second
        if gap >= RATE_WINDOW:
            self._buckets = [0] * RATE_WINDOW
        else:
            for step in range(1, gap + 1):
                self._buckets[(self._second + step) % RATE_WINDOW] = 0
        self._second = max(second, self._second)

    def accepted(self, now: float) -> None:
        if self.last is None or now - self.last >= RATE_WINDOW:
            self._since = now
        self._advance(now)
        self._buckets[self._second % RATE_WINDOW] += 1
        self.last = now

    def per_second(self, now: float) -> float:
        self._advance(now)
        span = min(RATE_WINDOW, max(1.0, now - self._since))
        return sum(self._buckets) / span


class PoolMember(Protocol):
    """
    What the pool holds: a connection that can be closed, and says when it
    is.
    """

    @property
    def closed(self) -> Deferred[None]: ...

    def close(self) -> None: ...


M = TypeVar("M", bound=PoolMember)


@define(eq=False)
class _Ready(Generic[M]):
    connection: M
    since: float
    expiry: IDelayedCall | None = None


class WarmPool(Generic[M]):
    """
    Ready connections, dialled with C{dial}, which fires once a connection's
    handshake is done, or returns C{None} when no dial may start now.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        dial: Callable[[], Deferred[M] | None],
        settings: PoolSettings = NO_POOL,
    ) -> None:
        self._clock = clock
        self._dial = dial
        self.settings = settings
        self._rate = AcceptRate()
        self._ready: list[_Ready[M]] = []
        self._dialing: set[Deferred[M]] = set()
        #: Those of them that replace a taken connection.
        self._replacing: set[Deferred[M]] = set()
        #: Connections made before the last L{reset} are not kept.
        self._generation = 0
        self._handshake_seconds = FIRST_HANDSHAKE_GUESS
        #: How long a taken connection waits for its answer (estimated).
        self._answer_seconds = 0.0
        #: The shortest idle life the ingress allowed a ready connection
        #: (L{replacement_age} applies the floor), and when it did.
        self._idle_life: tuple[float, float] | None = None
        #: The shortest idle life said in the log.
        self._life_said: float | None = None
        self._discards = DiscardCount()
        self._short = Shortfall()
        #: No dials until then, after a storm of discards.
        self._storm_until: float | None = None
        self._storm_said = False
        self._paused = False
        self._stopped = False
        #: When the demand next drops: the end of the idle timeout, then
        #: of the linger.
        self._quiet: IDelayedCall | None = None
        #: Ready connections lost, or retired unused.
        self.lost = 0
        self.retired = 0

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def dialing(self) -> int:
        return len(self._dialing)

    @property
    def max_age(self) -> float:
        """
        How long a ready connection is kept: the setting, or less if the
        ingress closed an idle one sooner.
        """
        if self._idle_life is None:
            return self.settings.max_age
        learned, when = self._idle_life
        elapsed = self._clock.seconds() - when
        return replacement_age(learned, elapsed, self.settings.max_age)

    def configure(self, settings: PoolSettings) -> None:
        """
        Size and age connections by C{settings} from now on.
        """
        self.settings = settings
        while len(self._ready) > settings.size:
            self._retire(self._ready[0])
        if self._quiet is not None:
            self._quiet.cancel()
            self._check_quiet()  # the idle timeout or the linger moved
        self._refill()

    def handshake_took(self, seconds: float) -> None:
        """
        A dial's TCP and TLS handshake took C{seconds}: size the pool by it.
        """
        self._handshake_seconds += HANDSHAKE_WEIGHT * (
            seconds - self._handshake_seconds
        )

    def take(self) -> M | None:
        """
        Count an accepted connection, and give it a ready connection to the
        ingress if there is one.
        """
        if self.settings.size == 0:
            return None
        now = self._clock.seconds()
        self._rate.accepted(now)
        if self._quiet is None and not self._stopped:
            self._quiet = self._clock.callLater(
                self.settings.idle_timeout, self._check_quiet
            )
        # The newest: the least likely closed.
        entry = self._ready.pop() if self._ready else None
        replacing = bool(self._replacing)
        self._short.taken(
            entry is not None, len(self._ready), replacing, self.settings.size
        )
        if entry is None:
            if not self._dialing:
                self._refill(most=1)  # warming starts now, not at the answer
            return None
        _cancel(entry.expiry)
        self._discards.take(now)
        return entry.connection

    def answered(self, waited: float | None = None) -> None:
        """
        The ingress answered a request (upgraded or refused), on a taken
        connection after C{waited} seconds: the pool may dial again, and
        replaces what was taken. Not sooner: a handshake dialled while a
        connection waits for its answer would compete with it for the CPU,
        here and at the ingress; the pool is sized for that wait.
        """
        if waited is not None:
            self._answer_seconds += HANDSHAKE_WEIGHT * (waited - self._answer_seconds)
        self._paused = False
        self._refill(replacing=True)

    def failed(self) -> None:
        """
        A connection to the ingress failed before its answer: dial no more
        until the ingress answers a request.
        """
        self._paused = True

    def reset(self) -> None:
        """
        The client certificate or trust changed: drop the ready connections,
        and those being dialled when they complete, and dial new ones.
        """
        self._generation += 1
        for entry in list(self._ready):
            self._retire(entry)  # those being dialled are stale when done
        self._paused = False
        self._refill()

    def stop(self) -> None:
        """
        Close every ready connection and dial no more.
        """
        self._stopped = True
        _cancel(self._quiet)
        self._quiet = None
        self._empty()

    def _empty(self) -> None:
        for entry in list(self._ready):
            self._retire(entry)
        for dialing in list(self._dialing):
            dialing.cancel()

    def _idle(self, now: float) -> float | None:
        """
        Seconds since the last accepted connection; C{None} before the first.
        """
        last = self._rate.last
        return None if last is None else now - last

    def _demand(self, now: float) -> int:
        return pool_demand(
            self._idle(now),
            self._rate.per_second(now),
            self._handshake_seconds,
            self._answer_seconds,
            self.settings,
            self._short.more,
        )

    def _wanted(self) -> int:
        now = self._clock.seconds()
        if self._stopped or self._paused:
            return 0
        if self._storm_until is not None and now < self._storm_until:
            return 0
        return self._demand(now)

    def _refill(self, most: int | None = None, replacing: bool = False) -> None:
        """
        Dial what the demand lacks, at most C{most}; C{replacing} a taken
        connection, or not.
        """
        missing = self._wanted() - len(self._ready) - len(self._dialing)
        if most is not None:
            missing = min(missing, most)
        for _ in range(missing):
            dialing = self._dial()
            if dialing is None:
                return
            self._dialing.add(dialing)
            if replacing:
                self._replacing.add(dialing)
            dialing.addBoth(self._dialed, dialing, self._generation)

    def _dialed(
        self, result: M | Failure, dialing: Deferred[M], generation: int
    ) -> None:
        self._dialing.discard(dialing)
        self._replacing.discard(dialing)
        if isinstance(result, Failure):
            if not result.check(CancelledError):
                self.failed()  # the dialler logs it
            return
        stale = generation != self._generation or self._stopped
        if stale or len(self._ready) >= self.settings.size:
            result.close()
            self._refill()
            return
        entry: _Ready[M] = _Ready(result, self._clock.seconds())
        entry.expiry = self._clock.callLater(self.max_age, self._expired, entry)
        self._ready.append(entry)
        result.closed.addBoth(self._lost, entry)

    def _expired(self, entry: _Ready[M]) -> None:
        if entry in self._ready:
            self._retire(entry)
            self._discarded()
            self._refill()

    def _retire(self, entry: _Ready[M]) -> None:
        self._ready.remove(entry)
        _cancel(entry.expiry)
        self.retired += 1
        entry.connection.close()

    def _lost(self, result: object, entry: _Ready[M]) -> None:
        if entry not in self._ready:
            return  # taken, or closed by the pool
        self._ready.remove(entry)
        _cancel(entry.expiry)
        self.lost += 1
        self._learn(self._clock.seconds() - entry.since)
        self.failed()
        self._discarded()

    def _learn(self, life: float) -> None:
        """
        The ingress closed a ready connection C{life} seconds after its
        handshake: replace the next ones sooner. A close younger than a
        handshake is the ingress going away, not its idle timeout.
        """
        if life < self._handshake_seconds or life >= self.max_age / IDLE_LIFE_MARGIN:
            return
        self._idle_life = (life, self._clock.seconds())
        if self._life_said is None or life < self._life_said * IDLE_LIFE_MARGIN:
            # Said when the pool learns a much shorter life, not at every loss.
            self._life_said = life
            self.log.info(
                "the ingress closed a warm connection after {seconds:.1f} s"
                " unused; warm connections are now replaced after {max_age:.1f} s",
                seconds=life,
                max_age=self.max_age,
            )

    def _discarded(self) -> None:
        """
        A ready connection was closed unused: after a storm of them, dial
        none for a while.
        """
        now = self._clock.seconds()
        self._discards.discard(now)
        count = self._discards
        if not is_storm(count.discarded, count.taken, self.settings.size):
            return
        self._storm_until = now + STORM_PAUSE
        if not self._storm_said:
            self._storm_said = True
            self.log.warn(
                "{count} warm connections to the ingress were closed unused"
                " within {window:g} s ({taken} taken); dialling none for"
                " {pause:g} s at a time while this goes on",
                count=count.discarded,
                window=STORM_WINDOW,
                taken=count.taken,
                pause=STORM_PAUSE,
            )
        count.clear()

    def _check_quiet(self) -> None:
        """
        Keep no more than the demand now (the newest ready connections),
        and check again when it next drops.
        """
        self._quiet = None
        now = self._clock.seconds()
        idle = self._idle(now)
        if idle is not None and idle >= self.settings.idle_timeout:
            self._short.more = 0  # after a quiet period, connections come anew
        demand = self._demand(now)
        if demand == 0:
            # It stays so until the next accept.
            self._empty()
            self._storm_said = False  # a storm after a quiet period is news
            return
        while len(self._ready) > demand:
            self._retire(self._ready[0])
        assert idle is not None  # a demand follows an accept
        settings = self.settings
        end = min(e for e in (settings.idle_timeout, settings.linger) if e > idle)
        self._quiet = self._clock.callLater(end - idle, self._check_quiet)


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()
