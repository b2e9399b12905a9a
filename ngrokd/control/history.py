# -*- test-case-name: ngrokd.test.test_web -*-
"""
A short memory of each endpoint's connections, for the web page's
sparklines.

Every L{SAMPLE_INTERVAL} seconds the history reads each endpoint's count of
accepted connections and keeps the last L{KEEP} counts in a fixed-size
array per endpoint; an endpoint that is gone is forgotten at the next
sample. With 10,000 endpoints that is a few megabytes, and a sample costs
one pass over the status rows.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from ngrokd.status import EndpointStatus

#: Seconds between two samples.
SAMPLE_INTERVAL = 10.0
#: Samples kept per endpoint: five minutes at the default interval.
KEEP = 31


class ConnectionHistory(Service):
    """
    Samples the endpoints' accepted-connection counts.
    """

    def __init__(
        self,
        endpoint_status: Callable[[], Sequence[EndpointStatus]],
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        keep: int = KEEP,
    ) -> None:
        self._endpoint_status = endpoint_status
        self._clock = clock
        self.interval = interval
        self._keep = keep
        self._totals: dict[str, array[int]] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return None

    def sample(self) -> None:
        """
        Keep each endpoint's count of accepted connections now.
        """
        totals: dict[str, array[int]] = {}
        for row in self._endpoint_status():
            kept = self._totals.get(row.id)
            if kept is None:
                kept = array("q")
            elif len(kept) >= self._keep:
                del kept[0]
            kept.append(row.connections_total)
            totals[row.id] = kept
        self._totals = totals

    def accepted(self, endpoint_id: str) -> list[int]:
        """
        Connections accepted by the endpoint in each interval between the
        kept samples, oldest first (empty before the second sample).
        """
        kept = self._totals.get(endpoint_id)
        if kept is None:
            return []
        return [max(0, b - a) for a, b in itertools.pairwise(kept)]
