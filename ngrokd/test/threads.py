"""
Which thread ngrokd's blocking file work runs on: a recorder of the real
read and write functions, and an L{ngrokd.blocking.InThread} for
synchronous tests.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, execute
from twisted.trial.unittest import SynchronousTestCase

from ngrokd import atomic, readfile

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: The functions that read or write a file (the writes wait for fsync), by
#: the name modules import them under.
BLOCKING = {
    "write_atomic": atomic.write_atomic,
    "replace_durably": atomic.replace_durably,
    "read_if_exists": atomic.read_if_exists,
    "read_regular": readfile.read_regular,
}


def at_once(
    work: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
) -> Deferred[_T]:
    """
    Run C{work} now, in this thread: for tests that have no reactor
    running.
    """
    return execute(work, *args, **kwargs)


@frozen
class Call:
    """
    C{function} was called for C{path}, on the reactor thread or not.
    """

    function: str
    path: str
    on_reactor_thread: bool


class BlockingCalls:
    """
    Records each call of the L{BLOCKING} functions for a path C{wanted}
    accepts, with the thread it ran on, wherever an C{ngrokd} module
    imported them, until the test ends. The functions still do their work.

    The reactor runs on the main thread, as under trial.
    """

    def __init__(self, case: SynchronousTestCase, wanted: Callable[[str], bool]):
        self.calls: list[Call] = []
        self._wanted = wanted
        self._lock = threading.Lock()
        for name, module in list(sys.modules.items()):
            if not name.startswith("ngrokd.") or name.startswith("ngrokd.test."):
                continue
            for function, real in BLOCKING.items():
                if getattr(module, function, None) is real:
                    case.patch(module, function, self._recording(function, real))

    def _recording(self, function: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(path: str, *args: Any, **kwargs: Any) -> Any:
            if self._wanted(path):
                on_reactor = threading.current_thread() is threading.main_thread()
                with self._lock:
                    self.calls.append(Call(function, path, on_reactor))
            return real(path, *args, **kwargs)

        return recorded

    def functions(self) -> set[str]:
        """
        The functions called.
        """
        with self._lock:
            return {call.function for call in self.calls}

    def on_reactor_thread(self) -> list[Call]:
        """
        The calls that blocked the reactor.
        """
        with self._lock:
            return [call for call in self.calls if call.on_reactor_thread]
