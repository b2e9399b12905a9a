# -*- test-case-name: ngrokd.test.test_health -*-
"""
The health server's HTTP site.

Every request's C{Host} is checked before its path is looked at: a name
that is not an IP address, C{localhost} or one of C{server.web_hosts} gets
403 on every path, so a page whose name is made to resolve to this machine
(DNS rebinding) reads nothing. Bodies are dropped unread, and no access
log is written.
"""

from __future__ import annotations

from collections.abc import Collection
from io import BytesIO

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ngrokd.control.web import ForeignHost, host_allowed


class _BodylessRequest(Request):
    """
    A request whose body is dropped as it arrives: no page reads one, and
    an unread body must not fill memory or a temporary file.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        pass


class HealthSite(Site):
    """
    The health server's site: C{root}, guarded by the C{Host} rule, on
    C{clock}'s time.
    """

    noisy = False
    requestFactory = _BodylessRequest

    def __init__(
        self,
        root: Resource,
        names: Collection[str],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        Site.__init__(self, root, timeout=idle_timeout, reactor=clock)
        self._names = names
        self._foreign = ForeignHost()

    def getResourceFor(self, request: Request) -> IResource:
        if not host_allowed(request.getHeader(b"host"), self._names):
            return self._foreign
        resource: IResource = Site.getResourceFor(self, request)
        return resource

    def log(self, request: object) -> None:
        """
        No access log: probes every few seconds would drown the daemon's
        own messages.
        """
