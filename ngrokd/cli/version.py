# -*- test-case-name: ngrokd.test.test_cli -*-
"""
What C{--version} says: ngrokd's version, and those of the parts a bug
report needs (Python, Twisted, pyOpenSSL, cryptography and the OpenSSL it
links), read only when asked so that building a parser imports nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from typing import Any

from ngrokd import __version__


def version_text(prog: str) -> str:
    """
    C{prog}'s version line, then the versions it runs with.
    """
    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return (
        f"{prog} {__version__}\n"
        f"Python {platform.python_version()}, Twisted {twisted.__version__},"
        f" pyOpenSSL {OpenSSL.__version__}, cryptography"
        f" {cryptography.__version__}, {openssl}"
    )


class VersionAction(argparse.Action):
    """
    C{--version}: print L{version_text} and exit 0.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="print the versions of ngrokd, Twisted, pyOpenSSL and OpenSSL",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(version_text(parser.prog) + "\n")
        parser.exit()
