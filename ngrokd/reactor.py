# -*- test-case-name: ngrokd.test.test_tap -*-
"""
The reactor the daemon runs on, as one type.

Twisted types each part of a reactor as its own interface; the daemon hands
its reactor to parts that take one or another. L{IDaemonReactor} names all
of those the daemon uses at once, a make-believe interface as Twisted's own
C{twisted.internet.reactor} is typed: twistd's reactors provide every one.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
)


class IDaemonReactor(
    IReactorCore, IReactorTime, IReactorThreads, IReactorTCP, IReactorUDP
):
    """
    What the daemon asks of its reactor: its core, time, threads, TCP
    (listeners, the ingress, the API) and UDP (the DNS server).
    """
