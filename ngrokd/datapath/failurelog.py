# -*- test-case-name: ngrokd.test.test_failurelog -*-
"""
Failed connections, logged so that a flood stays readable: the first
failure of a kind for an endpoint in full, the next ones counted into one
line at most every few seconds (L{ngrokd.summarylog}).
"""

from __future__ import annotations

from twisted.logger import Logger

from ngrokd.summarylog import Key, Summary, SummaryLog


class FailureLog(SummaryLog):
    """
    Logs failed connections, each kind of failure for each endpoint
    summarised.
    """

    log = Logger()

    def failed(self, url: str, kind: str, reason: str) -> None:
        """
        A connection to the endpoint C{url} failed, for C{reason}.
        """
        self.occurred((url, kind), reason)

    def first(self, key: Key, reason: str) -> None:
        url, kind = key
        self.log.warn(
            "connection to {url} failed: {reason}",
            url=url,
            reason=reason,
            error_type=kind,
        )

    def more(self, summary: Summary) -> None:
        url, kind = summary.key
        self.log.warn(
            "{count} more connections to {url} failed: {reason}",
            count=summary.count,
            url=url,
            reason=summary.reason,
            error_type=kind,
        )
