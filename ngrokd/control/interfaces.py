# -*- test-case-name: ngrokd.test.test_control -*-
"""
The reactor the control wing runs on, as one interface.

Twisted describes each part of a reactor apart (L{IReactorTime},
L{IReactorThreads}...) and Python's types have no intersection, so the
parts that need several take an L{IControlReactor}; those that need one
take that one. A reactor Twisted installs provides them all, though it
types C{twisted.internet.reactor} as its common part only.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
    IReactorUNIX,
)


class IControlReactor(
    IReactorTime,
    IReactorThreads,
    IReactorFDSet,
    IReactorTCP,
    IReactorUDP,
    IReactorUNIX,
):
    """
    Timers (timeouts, idle connections, polls), threads for blocking work
    (group and name lookups, file reads and writes), file descriptors (the
    config watcher's inotify), TCP and UNIX sockets (the control socket and
    its client, the health server, diagnose's probes), UDP (diagnose's
    question to the DNS server).
    """
