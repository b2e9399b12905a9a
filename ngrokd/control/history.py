# -*- test-case-name: ngrokd.test.test_web -*-
"""
A short memory of each endpoint's connections, for the web page's
sparklines.

Every L{SAMPLE_INTERVAL} seconds the history keeps each endpoint's count of
accepted connections, the last L{KEEP} counts in a fixed-size array per
endpoint; an endpoint that is gone is forgotten at the next sample. With
10,000 endpoints that is a few megabytes. A sample reads only the rows
that changed since the previous one (the kept rows say which): a count
that did not change is the last one kept, repeated when read.
"""

from __future__ import annotations

import itertools
from array import array

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from ngrokd.control.feed import WatchedRows

#: Seconds between two samples.
SAMPLE_INTERVAL = 10.0
#: Samples kept per endpoint: five minutes at the default interval.
KEEP = 31


@define
class _Counts:
    #: The counts kept, the last one taken at sample C{last}.
    totals: array[int]
    last: int


class ConnectionHistory(Service):
    """
    Samples the endpoints' accepted-connection counts.
    """

    def __init__(
        self,
        rows: WatchedRows,
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        keep: int = KEEP,
    ) -> None:
        self._rows = rows
        self._clock = clock
        self.interval = interval
        self._keep = keep
        self._counts: dict[str, _Counts] = {}
        self._samples = 0
        #: The endpoints whose rows changed since the last sample.
        self._changed: dict[str, None] = {}
        rows.watch(self._changed.setdefault)
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
        Keep the count of accepted connections of each endpoint that
        changed; forget those gone.
        """
        self._samples += 1
        now = self._samples
        for id in self._changed:
            row = self._rows.row(id)
            if row is None:
                self._counts.pop(id, None)
                continue
            kept = self._counts.get(id)
            if kept is None:
                self._counts[id] = _Counts(array("q", [row.connections_total]), now)
                continue
            self._fill(kept, now - 1)
            kept.totals.append(row.connections_total)
            kept.last = now
            self._trim(kept)
        self._changed.clear()

    def _fill(self, kept: _Counts, until: int) -> None:
        """
        Repeat the last count for the samples that found it unchanged.
        """
        missed = min(until - kept.last, self._keep)
        if missed > 0:
            kept.totals.extend(itertools.repeat(kept.totals[-1], missed))
            kept.last = until
            self._trim(kept)

    def _trim(self, kept: _Counts) -> None:
        if len(kept.totals) > self._keep:
            del kept.totals[: len(kept.totals) - self._keep]

    def accepted(self, endpoint_id: str) -> list[int]:
        """
        Connections accepted by the endpoint in each interval between the
        kept samples, oldest first (empty before the second sample).
        """
        kept = self._counts.get(endpoint_id)
        if kept is None:
            return []
        totals = list(kept.totals)
        missed = min(self._samples - kept.last, self._keep)
        totals += [totals[-1]] * missed
        totals = totals[-self._keep :]
        return [max(0, b - a) for a, b in itertools.pairwise(totals)]
