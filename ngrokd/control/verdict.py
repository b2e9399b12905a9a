# -*- test-case-name: ngrokd.test.test_hops -*-
"""
What C{ngrokctl diagnose} found at each hop, and its verdict: the first
broken one.

Apart from the checks (L{ngrokd.control.hops}) so that C{ngrokctl}'s output
(L{ngrokd.control.render}) needs only these values, not what the checks
import.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen

PASS = "pass"
FAIL = "fail"
SKIP = "skip"


@frozen
class Check:
    """
    One hop: what was checked, how it went, what was found, what to do.
    """

    name: str
    state: str
    detail: str = ""
    hint: str = ""


def first_broken(checks: Iterable[Check]) -> Check | None:
    """
    The first failed check, where the path breaks.
    """
    return next((check for check in checks if check.state == FAIL), None)
