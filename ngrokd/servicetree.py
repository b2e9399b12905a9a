# -*- test-case-name: ngrokd.test.test_servicetree,ngrokd.test.test_tap -*-
"""
Typed doors into Twisted's service tree.

C{twisted.application.service} carries no annotations. mypy lets strict
code call Twisted's own classes (C{untyped_calls_exclude}), but a call
through one of our subclasses names the subclass, and is refused.
L{attach} and L{Parent} make those calls on Twisted's classes, with the
types they have, so every module that builds a service tree stays strict.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred


def attach(child: Service, parent: MultiService) -> None:
    """
    Make C{child} a child of C{parent}: started when C{parent} starts (or at
    once if it runs), stopped before C{parent}'s stop completes.
    """
    child.setServiceParent(parent)


class Parent(MultiService):
    """
    A L{MultiService} whose start and stop a subclass can extend from strict
    code.
    """

    def __init__(self) -> None:
        MultiService.__init__(self)

    def privilegedStartService(self) -> None:
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        MultiService.startService(self)

    def stopService(self) -> Deferred[None]:
        """
        Stop the children, last attached first; fires when all have stopped.
        """
        stopped: Deferred[object] = MultiService.stopService(self)
        return stopped.addCallback(lambda _: None)
