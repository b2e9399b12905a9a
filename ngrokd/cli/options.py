# -*- test-case-name: ngrokd.test.test_cli -*-
"""
Options a command line takes before or after its subcommand's name.

C{ngrokctl --config F diagnose} and C{ngrokctl diagnose --config F} mean
the same. Each such option is on the top parser (default C{None}) and on
every subparser (default suppressed, so that a value given before the
name is kept), shown where it applies and hidden where it does not. A
value given to a command it does not apply to is refused naming the
commands it belongs to, wherever it was written.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence
from typing import Any

from attrs import frozen


@frozen
class Anywhere:
    """
    One option accepted before or after the subcommand.

    @ivar flags: its spellings (C{("-o", "--output")}).
    @ivar applies: the subcommands it means something to; empty for all.
    @ivar settings: the rest of C{add_argument}'s arguments (C{help},
        C{metavar}, C{choices}), without C{default}.
    """

    flags: tuple[str, ...]
    applies: frozenset[str]
    settings: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.flags[-1].lstrip("-").replace("-", "_")

    def add_to_top(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, default=None, **self.settings)

    def add_to_command(self, parser: argparse.ArgumentParser, name: str) -> None:
        settings = dict(self.settings, default=argparse.SUPPRESS)
        if name not in self.applies:
            settings["help"] = argparse.SUPPRESS
        parser.add_argument(*self.flags, **settings)


def anywhere(*flags: str, applies: Collection[str] = (), **settings: Any) -> Anywhere:
    return Anywhere(tuple(flags), frozenset(applies), settings)


def misplaced(
    options: Sequence[Anywhere], command: str, given: argparse.Namespace
) -> str | None:
    """
    What is wrong when an option was given to a command it does not apply
    to; C{None} when nothing is.
    """
    for option in options:
        if not option.applies or command in option.applies:
            continue
        if getattr(given, option.dest, None) is not None:
            *others, last = sorted(option.applies)
            where = f"{', '.join(others)} and {last}" if others else last
            return f"{'/'.join(option.flags)} is for {where}, not {command}"
    return None
