# -*- test-case-name: ngrokd.test.test_dns_wire -*-
"""
Queries a second per source address: a token bucket for each, so that one
client flooding the server is dropped while every other is still answered.

At most C{max_sources} buckets are kept; a new source beyond that takes the
place of the one seen first. A flood from forged addresses can thus not
grow the table, only cycle it; it is bounded by the server's other limits.
"""

from __future__ import annotations

from attrs import define


@define
class _Bucket:
    tokens: float
    stamp: float


class SourceRates:
    """
    Whether a query from a source may be answered now.

    @ivar rate: queries a second each source may send, on average.
    @ivar burst: queries a source may send at once after a quiet spell.
    """

    def __init__(self, rate: float, burst: float, max_sources: int) -> None:
        self.rate = rate
        self.burst = burst
        self._max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, source: str, now: float) -> bool:
        """
        Take a token from C{source}'s bucket at C{now}: whether it had one.
        """
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if tokens < 1:
            bucket.tokens = tokens
            return False
        bucket.tokens = tokens - 1
        return True

    def __len__(self) -> int:
        return len(self._buckets)
