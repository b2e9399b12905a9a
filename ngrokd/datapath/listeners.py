# -*- test-case-name: ngrokd.test.test_listeners -*-
"""
The set of local listeners, one per planned endpoint.

L{ListenerSet.reconcile} takes the whole desired set and makes it so: gone
specs stop listening (first, so that what they free can be reused at once),
new ones are listened on, changed ones are rebound (the new socket first, so
clients never see a gap where they can), and unchanged ones are not touched:
what L{ngrokd.plan.listener_changes} decides.
Connections already accepted are never dropped by a reconcile: closing a
listening socket leaves them alone. A spec that cannot be bound stays in the
set as failed, with the reason (for a port in use, which process holds it,
where L{ngrokd.host.portowner} can tell), and is tried again at the next
reconcile; the others are not affected.

An endpoint may have a second listener, on its hostname's IPv6 address
(L{ngrokd.plan.Plan.specs6}), kept the same way in
L{ListenerSet.listeners6}. It shares the endpoint's factory, so its
connections count with the endpoint's and are drained with them.
"""

from __future__ import annotations

import errno
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import chain
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ngrokd.datapath.bridge import BridgeFactory, ConnectionTimings, EndpointStats
from ngrokd.datapath.descriptors import AcceptGuard
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.endpoints import join_host_port
from ngrokd.host.portowner import port_owners
from ngrokd.plan import ListenerChanges, ListenSpec, listener_changes

#: Connections the kernel queues for each listener before ngrokd accepts them,
#: so that a burst waits instead of being refused (capped by the kernel's
#: C{net.core.somaxconn}).
LISTEN_BACKLOG = 4096


#: While a reconcile adds many listeners, a turn of the reactor comes after
#: this many seconds of binds (and at least this many binds).
BIND_SLICE = 0.005
BINDS_AT_LEAST = 32


@define
class Listener:
    """
    One endpoint's listener and what became of it.
    """

    spec: ListenSpec
    factory: BridgeFactory
    port: IListeningPort | None = None
    error: str = ""
    #: Who held the port at the last failed bind that could tell: a later
    #: lookup that finds nobody (a process scan is racy) keeps them.
    holders: tuple[str, ...] = ()

    @property
    def listening(self) -> bool:
        return self.port is not None

    @property
    def stats(self) -> EndpointStats:
        return self.factory.stats


def in_use(failure: Failure) -> bool:
    """
    Whether a listen failed because another socket holds the address and port.
    """
    error = failure.value
    return (
        isinstance(error, CannotListenError)
        and isinstance(error.socketError, OSError)
        and error.socketError.errno == errno.EADDRINUSE
    )


def describe_listen_error(
    failure: Failure, spec: ListenSpec, owners: Sequence[str] = ()
) -> str:
    """
    A short reason a user can act on.

    @param owners: the processes holding the port, when known.
    """
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        code = error.socketError.errno
        where = join_host_port(spec.address, spec.port)
        if code == errno.EADDRINUSE:
            holders = ", ".join(owners) or "another program"
            return f"{where} is already in use by {holders}"
        if code == errno.EADDRNOTAVAIL:
            if spec.virtual:
                return f"{spec.address} is not an address of this machine (any more)"
            return (
                f"{spec.address} is not an address of this machine (check"
                f" net.listen_interface and net.overrides)"
            )
        if code == errno.EACCES:
            return f"{where}: permission denied (ports below 1024 need root)"
        return f"{where}: {error.socketError.strerror}"
    return failure.getErrorMessage()


class ListenerSet:
    """
    Keeps the listeners equal to the latest plan. Keys are endpoint URLs
    (normalised), values their specs.

    @ivar listeners: each endpoint's listener.
    @ivar listeners6: the IPv6 listener of the endpoints that have one.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        connector: IngressConnector,
        find_owners: Callable[[str, int], Deferred[list[str]]] | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        """
        @param reactor: listens; it must also provide L{IReactorTime} and,
            unless C{find_owners} is given, L{IReactorThreads}.
        @param find_owners: names the processes holding an address and port
            (by default L{port_owners}, in a thread of the reactor's pool).
        @param idle_timeout: reset connections idle for this many seconds.
        """
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._connector = connector
        self._find_owners = find_owners or self._owners_in_thread
        self._idle_timeout = idle_timeout
        self._guard = AcceptGuard(
            self._clock, connector.descriptors, lambda: connector.queue.waiting
        )
        self.listeners: dict[str, Listener] = {}
        self.listeners6: dict[str, Listener] = {}
        #: Observes the connections of listeners made from now on.
        self.timings: ConnectionTimings | None = None
        self._watchers: list[Callable[[str], object]] = []
        #: What every listener has carried, those gone included.
        self.totals = EndpointStats()
        #: Counts the stops, so that a reconcile under way ends at one.
        self._stops = 0

    def watch(self, watcher: Callable[[str], object]) -> None:
        """
        Call C{watcher} with a listener's URL when it is added, removed,
        listens, fails, or counts a connection.
        """
        self._watchers.append(watcher)

    def _changed(self, key: str) -> None:
        for watcher in self._watchers:
            watcher(key)

    @property
    def connections_open(self) -> int:
        """
        Accepted connections open now, over every listener.
        """
        return sum(x.stats.connections_open for x in self.listeners.values())

    def _owners_in_thread(self, address: str, port: int) -> Deferred[list[str]]:
        threads = IReactorThreads(self._reactor)
        return deferToThreadPool(
            threads, threads.getThreadPool(), port_owners, address, port
        )

    def reconcile(
        self,
        specs: Mapping[str, ListenSpec],
        specs6: Mapping[str, ListenSpec] | None = None,
    ) -> Deferred[None]:
        """
        Listen on C{specs} (and the IPv6 listeners of C{specs6}, whose keys
        are some of C{specs}') and nothing else; fires when every bind was
        tried. Listeners no longer wanted stop first, so that what they
        free (an address and port handed to another endpoint) can be bound
        at once.
        """
        specs6 = specs6 or {}
        gone = []
        for listeners, wanted in ((self.listeners, specs), (self.listeners6, specs6)):
            for key in _changes(listeners, wanted).stop:
                gone.append(listeners.pop(key))
                self._changed(key)
        stopping = DeferredList(
            [self._stop(listener) for listener in gone], consumeErrors=True
        )
        return stopping.addCallback(lambda _: self._apply_both(specs, specs6))

    def _apply_both(
        self, specs: Mapping[str, ListenSpec], specs6: Mapping[str, ListenSpec]
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._apply_in_slices(specs, specs6))

    def _new_factory(self, key: str, spec: ListenSpec) -> BridgeFactory:
        stats = EndpointStats(totals=self.totals, on_change=partial(self._changed, key))
        return BridgeFactory(
            spec.target,
            self._connector,
            spec.rewrite_host,
            stats=stats,
            timings=self.timings,
            idle_timeout=self._idle_timeout,
        )

    async def _apply_in_slices(
        self, specs: Mapping[str, ListenSpec], specs6: Mapping[str, ListenSpec]
    ) -> None:
        """
        Bind what is new or changed, the endpoints' listeners then their
        IPv6 ones (which share the endpoint's factory), L{BIND_SLICE}
        seconds of binds at a time with a turn of the reactor between, so
        that thousands of new listeners do not hold up the connections of
        those that listen; a stop under way ends it.
        """
        work: list[Deferred[None]] = []
        stops, turn, began = self._stops, BINDS_AT_LEAST, time.perf_counter()
        # Decided once the stops are done, on the listeners as they are then.
        binds4 = _Binds.of(_changes(self.listeners, specs))
        binds6 = _Binds.of(_changes(self.listeners6, specs6))
        both = chain(
            (
                (self.listeners, binds4, key, spec, self._new_factory)
                for key, spec in specs.items()
            ),
            (
                (self.listeners6, binds6, key, spec, self._factory_of)
                for key, spec in specs6.items()
            ),
        )
        for listeners, binds, key, spec, factory_for in both:
            if len(work) >= turn and time.perf_counter() - began > BIND_SLICE:
                await deferLater(self._clock, 0, lambda: None)
                if self._stops != stops:
                    break
                turn, began = len(work) + BINDS_AT_LEAST, time.perf_counter()
            work.extend(self._apply(listeners, binds, key, spec, factory_for))
        await DeferredList(work, consumeErrors=True)

    def _factory_of(self, key: str, spec: ListenSpec) -> BridgeFactory:
        return self.listeners[key].factory

    def _apply(
        self,
        listeners: dict[str, Listener],
        binds: _Binds,
        key: str,
        spec: ListenSpec,
        factory_for: Callable[[str, ListenSpec], BridgeFactory],
    ) -> list[Deferred[None]]:
        """
        Do to the listener of C{key} in C{listeners} what C{binds} says
        (it is to be C{spec}): the binds this started.
        """
        if key in binds.start:
            listener = Listener(spec, factory_for(key, spec))
            listeners[key] = listener
            self._changed(key)
            return [self._listen(key, listener)]
        current = listeners[key]
        if key in binds.rebind:
            return [self._rebind(listeners, key, current, spec)]
        if key in binds.update:
            current.spec = spec
            current.factory.target = spec.target
            current.factory.rewrite_host = spec.rewrite_host
            self._changed(key)
        return [self._listen(key, current)] if key in binds.retry else []

    def stop(self) -> Deferred[None]:
        """
        Stop every listener; accepted connections carry on, but HTTP ones
        end at their next response boundary (the grace of a stop starts).
        """
        self._stops += 1
        kept, self.listeners = self.listeners, {}
        kept6, self.listeners6 = self.listeners6, {}
        listeners, listeners6 = list(kept.values()), list(kept6.values())
        for key in {**kept, **kept6}:
            self._changed(key)
        stopping = DeferredList(
            [self._stop(listener) for listener in listeners + listeners6],
            consumeErrors=True,
        )
        for listener in listeners:
            listener.factory.drain()
        return stopping.addCallback(lambda _: None)

    def _endpoint(self, spec: ListenSpec) -> Any:
        address = ipaddress.ip_address(spec.address)
        kind = TCP6ServerEndpoint if address.version == 6 else TCP4ServerEndpoint
        return kind(
            self._reactor, spec.port, backlog=LISTEN_BACKLOG, interface=spec.address
        )

    def _listen(self, key: str, listener: Listener) -> Deferred[None]:
        spec = listener.spec

        def listening(port: IListeningPort) -> None:
            self._guard.watch(port)
            listener.port, listener.error, listener.holders = port, "", ()
            self._changed(key)
            self.log.info(
                "listening for {url} on {address}",
                url=key,
                address=join_host_port(spec.address, spec.port),
            )

        def failed(failure: Failure) -> Deferred[None] | None:
            if not in_use(failure):
                record(failure, [])
                return None
            owners = self._find_owners(spec.address, spec.port)
            owners.addErrback(unknown_owners)
            return owners.addCallback(lambda found: record(failure, found))

        def unknown_owners(failure: Failure) -> list[str]:
            self.log.failure(
                "cannot tell who holds {address}:{port}",
                failure,
                LogLevel.warn,
                address=spec.address,
                port=spec.port,
            )
            return []

        def record(failure: Failure, owners: list[str]) -> None:
            if in_use(failure):
                owners = owners or list(listener.holders)
                listener.holders = tuple(owners)
            reason = describe_listen_error(failure, spec, owners)
            if reason != listener.error:
                self.log.error(
                    "cannot listen for {url}: {reason}", url=key, reason=reason
                )
            listener.port, listener.error = None, reason
            self._changed(key)

        d: Deferred[Any] = self._endpoint(spec).listen(listener.factory)
        return d.addCallbacks(listening, failed)

    def _rebind(
        self,
        listeners: dict[str, Listener],
        key: str,
        listener: Listener,
        spec: ListenSpec,
    ) -> Deferred[None]:
        old_port = listener.port
        new = Listener(spec, listener.factory)
        new.factory.target = spec.target
        new.factory.rewrite_host = spec.rewrite_host
        if old_port is not None and _overlaps(listener.spec, spec):
            # The new bind would collide with the old socket: release it first.
            before: Deferred[Any] = self._stop_port(old_port)
            old_port = None
        else:
            before = succeed(None)
        listeners[key] = new
        self._changed(key)

        def bind(_: object) -> Deferred[None]:
            return self._listen(key, new)

        def release(_: object) -> Deferred[None] | None:
            if old_port is not None:
                return self._stop_port(old_port)
            return None

        return before.addCallback(bind).addCallback(release)

    def _stop(self, listener: Listener) -> Deferred[None]:
        port, listener.port = listener.port, None
        if port is None:
            return succeed(None)
        self.log.info(
            "stopped listening for {url} on {address}",
            url=listener.spec.target.url,
            address=join_host_port(listener.spec.address, listener.spec.port),
        )
        return self._stop_port(port)

    def _stop_port(self, port: IListeningPort) -> Deferred[None]:
        self._guard.forget(port)
        stopping: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopping


def _changes(
    listeners: Mapping[str, Listener], wanted: Mapping[str, ListenSpec]
) -> ListenerChanges:
    """
    What makes C{listeners} match C{wanted} (L{listener_changes}).
    """
    return listener_changes(
        {key: listener.spec for key, listener in listeners.items()},
        {key for key, listener in listeners.items() if listener.listening},
        wanted,
    )


@frozen
class _Binds:
    """
    The binds of a L{ListenerChanges}, by kind, for a look-up per key as the
    wanted specs are gone through in their order.
    """

    start: frozenset[str]
    rebind: frozenset[str]
    update: frozenset[str]
    retry: frozenset[str]

    @classmethod
    def of(cls, changes: ListenerChanges) -> _Binds:
        return cls(
            frozenset(changes.start),
            frozenset(changes.rebind),
            frozenset(changes.update),
            frozenset(changes.retry),
        )


def _overlaps(old: ListenSpec, new: ListenSpec) -> bool:
    """
    Whether binding C{new} while C{old} is bound would fail: the same port on
    the same address, or on a wildcard that covers the other.
    """
    if old.port != new.port:
        return False
    wildcards = {"0.0.0.0", "::"}
    return old.address == new.address or bool({old.address, new.address} & wildcards)
