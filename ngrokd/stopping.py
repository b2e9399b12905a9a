# -*- test-case-name: ngrokd.test.test_daemon_net,ngrokd.test.test_grace_http -*-
"""
How the daemon stops: bounded, and gentle with what is open.

The listeners close at once, the connections already open get
C{server.shutdown_grace} seconds to finish, the rest are reset (and
counted), and only then do the names and addresses go, with the rest of the
service tree. A second signal (L{Stopper.stop_now}) cuts the grace short;
a part that never finishes stopping holds the stop for a timeout at most,
and the log then says what it may leave behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.datapath.bridge import LocalProtocol

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon


class Stopper:
    """
    The stop of one L{Daemon}, from its listeners to its state directory.

    @ivar begun: whether the stop has begun; from then on, no reconcile
        starts and what the start was waiting for is not used.
    """

    log = Logger()

    def __init__(
        self,
        daemon: Daemon,
        reactor: IReactorTime,
        clock: IReactorTime,
        stop_children: Callable[[], Deferred[None]],
    ) -> None:
        """
        @param reactor: times the stop as a whole.
        @param clock: times the grace given to open connections.
        @param stop_children: stops the daemon's service tree.
        """
        self._daemon = daemon
        self._reactor = reactor
        self._clock = clock
        self._stop_children = stop_children
        self.begun = False
        #: Fires to end the grace of a stop early.
        self._cut: Deferred[None] = Deferred()
        #: When a stop gives up waiting (moved back by the grace).
        self._deadline: IDelayedCall | None = None

    def stop(self, timeout: float) -> Deferred[None]:
        """
        Stop, within C{timeout} seconds as a whole beyond the grace given to
        open connections: when a part takes longer, the stop fires all the
        same and says so (the state directory stays locked until that part
        is done, or the process ends).
        """
        stopping: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        bounded: Deferred[None] = Deferred()

        def cut() -> None:
            self.log.error(
                "stopping took longer than {seconds:g}s; stopped without waiting"
                " for the rest, which may leave {left} (replaced at the next"
                " start)",
                seconds=timeout,
                left=self._left_behind(),
            )
            bounded.callback(None)

        timer = self._deadline = self._reactor.callLater(timeout, cut)

        def finished(result: Failure | None) -> None:
            if timer.active():
                timer.cancel()
                bounded.callback(result)
            elif isinstance(result, Failure):
                self.log.failure("stopping failed", result)

        stopping.addBoth(finished)
        return bounded

    async def _stop(self) -> None:
        # Listeners go first, at once: what comes after may wait (a
        # reconcile under way, a hosts file another process keeps locked).
        # They go before the hosts section and the addresses they use,
        # which the hosts and interface services remove when they stop.
        daemon = self._daemon
        self.begun = True
        try:
            for observer in daemon.stopping:
                observer()
            factories = [x.factory for x in daemon.listeners.listeners.values()]
            await daemon.listeners.stop()
            daemon.connector.pool.stop()  # nothing will take a warm connection
            await self._let_connections_finish(
                [c for factory in factories for c in factory.connections]
            )
            daemon.connector.stop()
            await daemon.applier.idle()
            await self._stop_children()
            await daemon.api.close()
        finally:
            # The files are written before another daemon may have them.
            await daemon.file_thread.stop()
            daemon.state_lock.release()

    def _left_behind(self) -> str:
        """
        The names and addresses a stop that gives up may leave.
        """
        hosts = self._daemon.hosts
        names = ", ".join(
            f"{name} {ip}" for name, ips in sorted(hosts.written.items()) for ip in ips
        )
        addresses = ", ".join(sorted(str(ip) for ip in self._daemon.applier.addresses))
        return (
            f"the names {names or '(none)'} in {hosts.file.path} and the"
            f" addresses {addresses or '(none)'}"
        )

    def stop_now(self) -> None:
        """
        End the grace of a stop (now, or when it begins): reset every
        connection still open.
        """
        if not self._cut.called:
            self._cut.callback(None)

    async def _let_connections_finish(self, connections: list[LocalProtocol]) -> None:
        """
        Give C{connections} the grace to finish, then reset the rest.
        """
        if not connections:
            return
        grace = self._daemon.config.server.shutdown_grace
        if not self._cut.called:
            self.log.info(
                "stopping: {count} open connections have {grace} s to finish",
                count=len(connections),
                grace=grace,
            )
        if self._deadline is not None and self._deadline.active():
            self._deadline.delay(grace)
        timer = self._clock.callLater(grace, self.stop_now)
        finished: Deferred[Any] = DeferredList([c.closed for c in connections])
        await DeferredList([finished, self._cut], fireOnOneCallback=True)
        if timer.active():
            timer.cancel()
        left = [c for c in connections if not c.closed.called]
        if left:
            self.log.warn(
                "stopping: reset {count} connections still open after the grace"
                " of {grace} s",
                count=len(left),
                grace=grace,
            )
            for connection in left:
                connection.abort()
            await DeferredList([c.closed for c in left])
