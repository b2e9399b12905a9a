# -*- test-case-name: ngrokd.test.test_discovery -*-
"""
How long to wait before trying again: exponential backoff with jitter, the
same rule for the discovery poll and for registration and renewal.
"""

from __future__ import annotations

from collections.abc import Callable

#: The longest wait between polls while the API keeps failing, in seconds.
MAX_BACKOFF = 300.0
#: The first wait after a failure, unless the interval is shorter.
FIRST_BACKOFF = 2.0
#: The longest C{Retry-After} honoured: a longer one is most likely an error.
MAX_RETRY_AFTER = 3600.0


def backoff_delay(
    failures: int, initial: float, cap: float, jitter: Callable[[], float]
) -> float:
    """
    The wait after C{failures} failures in a row (1 or more): C{initial}
    doubled at each further failure, capped at C{cap}, then scaled by a
    random factor between 0.5 and 1 ("equal jitter"), so that many clients
    failing at once do not retry in step. C{jitter} returns a number in
    [0, 1).
    """
    base = min(initial * 2.0 ** min(failures - 1, 64), cap)
    return base * (0.5 + 0.5 * jitter())
