# -*- test-case-name: ngrokd.test.test_blocking -*-
"""
Work that would block the reactor thread, done in a thread its owner keeps.

An C{fsync} can take seconds on a busy disk, and a read can wait on a slow
filesystem: on the reactor thread either stalls every connection. So such
work goes to a L{BlockingPool}, one thread that its owner starts with
itself and stops with itself: stopping waits for the work already given
(a state file half written when the state directory is unlocked would be
no help to the next daemon), then ends the thread. One thread keeps the
work in the order it was given.

Code that does such work takes an L{InThread}, the pool's L{BlockingPool.run}
in the daemon; a test may give it one that runs the work at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

_P = ParamSpec("_P")
_T = TypeVar("_T")


class InThread(Protocol):
    """
    Calls C{work(*args, **kwargs)} off the reactor thread; the Deferred
    fires, on the reactor thread, with its result.
    """

    def __call__(
        self, work: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]: ...


class PoolStopped(Exception):
    """
    Work was given to a L{BlockingPool} that is not running.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"the {self.name} thread is not running"


def one_thread(name: str) -> ThreadPool:
    """
    A pool of one thread, made when there is work and ended by a stop.
    """
    return ThreadPool(minthreads=0, maxthreads=1, name=name)


class BlockingPool:
    """
    A thread for blocking work, from L{start} to L{stop}.

    @param make_pool: makes the pool at each start (a stopped pool cannot
        start again).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        name: str,
        make_pool: Callable[[str], ThreadPool] = one_thread,
    ) -> None:
        self._reactor = reactor
        self.name = name
        self._make_pool = make_pool
        self._pool: ThreadPool | None = None
        #: Work given and not yet done (cancelling its Deferred does not
        #: stop a thread), and who waits for there to be none.
        self._busy = 0
        self._idle: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        if self._pool is None:
            self._pool = self._make_pool(self.name)
            self._pool.start()

    def run(
        self, work: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        """
        Call C{work(*args, **kwargs)} in the thread, after the work given
        before it.

        @return: fires with its result on the reactor thread, or fails with
            its exception, or with L{PoolStopped} when not running.
        """
        pool = self._pool
        if pool is None:
            return fail(PoolStopped(self.name))
        self._busy += 1
        result: Deferred[_T] = Deferred()

        # The caller may cancel its Deferred, which does not stop the
        # thread: the work is done only when the thread says so, and its
        # result is delivered before a stop hears of it. A cancelled result
        # ignores it.
        def succeeded(value: _T) -> None:
            result.callback(value)
            self._done()

        def failed(failure: Failure) -> None:
            result.errback(failure)
            self._done()

        deferToThreadPool(self._reactor, pool, work, *args, **kwargs).addCallbacks(
            succeeded, failed
        )
        return result

    def _done(self) -> None:
        self._busy -= 1
        if not self._busy:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)

    def stop(self) -> Deferred[None]:
        """
        Take no more work; once the work given is done, end the thread.
        Fires when it has ended.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        if not self._busy:
            pool.stop()
            return succeed(None)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        return idle.addCallback(lambda _: pool.stop())
