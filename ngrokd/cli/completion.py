# -*- test-case-name: ngrokd.test.test_cli -*-
"""
Shell completion scripts for C{ngrokctl} and C{ngrokd}, made from their
argparse parsers by U{shtab<https://github.com/iterative/shtab>}.

shtab writes a static script for each shell: a tab press runs only the
shell's own code, never Python (argcomplete would start the interpreter
and import the program on every press), and the script can be printed,
packaged or checked once. The options that name files or directories
complete as such.
"""

from __future__ import annotations

import argparse

import shtab

#: Options whose value is a file, or a directory.
_FILES = {"--config", "--socket"}
_DIRECTORIES = {"--root"}


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """
    The completion script of C{parser}'s program for C{shell} (C{bash},
    C{zsh} or C{fish}).
    """
    _mark_paths(parser)
    return shtab.complete(parser, shell=shell).rstrip("\n") + "\n"


def _mark_paths(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if _FILES & set(action.option_strings):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif _DIRECTORIES & set(action.option_strings):
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _mark_paths(sub)
