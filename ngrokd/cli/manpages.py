# -*- test-case-name: ngrokd.test.test_manpages -*-
"""
The man pages C{ngrokctl(1)}, C{ngrokd(8)} and C{ngrokd.yml(5)}, made at
build time (C{setup.py}'s C{build_man}): the first two from the argparse
parsers by argparse-manpage, the third from C{docs/configuration.rst} by
docutils' manpage writer, so that neither can drift from what it
describes.

argparse-manpage and docutils are build requirements, imported only here.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, cast

from ngrokd import __version__
from ngrokd.cli import ctl_parser, daemon_parser

#: Each page: its file, relative to the man directory.
PAGES = ("man1/ngrokctl.1", "man8/ngrokd.8", "man5/ngrokd.yml.5")
_MANUAL = "ngrokd manual"

_CTL_SECTIONS = {
    "exit status": r"""0 done; 1 failed (health: not ready; reload: the file is
invalid; diagnose: a hop is broken); 2 usage; 3 ngrokd is not running; 4
not allowed to this user; 5 timed out; 6 the two sides' versions differ; 7
a reload left keys for a restart.""",
    "environment": r"""
.TP
.B NGROKD_SOCKET
the control socket, when neither \-\-socket nor \-\-instance is given.
.TP
.B NO_COLOR
no colour, even on a terminal.
.TP
.BR VISUAL ", " EDITOR
the editor of
.BR "config edit" .""",
    "see also": r"""
.BR ngrokd (8),
.BR ngrokd.yml (5)""",
}

_DAEMON_SECTIONS = {
    "signals": r"""
.TP
.B SIGHUP
read the configuration again and apply what changed (as
.BR "ngrokctl reload" ).
.TP
.BR SIGTERM ", " SIGINT
stop: close the listeners, remove the addresses and the hosts file's
section, then end by the same signal.""",
    "files": r"""
.TP
.I /etc/ngrokd/config.yml
the configuration, see
.BR ngrokd.yml (5);
.I /etc/ngrokd/NAME/config.yml
for \-\-instance NAME.
.TP
.I /etc/ngrokd
the state: the key, the certificate, the operator id and the addresses and
ports given to endpoints.
.TP
.I /etc/systemd/system/ngrokd.service
the unit written by
.BR "ngrokd install" ;
.I /Library/LaunchDaemons/com.ngrok.ngrokd.plist
on macOS.
.TP
.I /var/run/ngrokd.sock
the control socket, for
.BR ngrokctl (1).""",
    "environment": r"""
.TP
.B NGROK_API_KEY
the API key, when the configuration gives none.
.TP
.B NGROKD_HOSTS_PATH
the hosts file, instead of net.hosts_file.
.TP
.B NGROKD_ROOT
the default of \-\-root.""",
    "see also": r"""
.BR ngrokctl (1),
.BR ngrokd.yml (5),
.BR twistd (1),
.BR systemctl (1)""",
}


def parser_page(
    parser: argparse.ArgumentParser,
    section: int,
    summary: str,
    sections: dict[str, str],
) -> str:
    """
    The man page of C{parser}'s program.
    """
    from argparse_manpage.manpage import Manpage

    page = Manpage(parser)
    page.section = section
    page.source = f"ngrokd {__version__}"
    page.manual = _MANUAL
    page.description = summary
    for heading, content in sections.items():
        page.add_section(heading, ">", content.strip("\n"))
    return str(page)


def config_page(rst: str) -> str:
    """
    C{ngrokd.yml(5)}: C{rst}, the configuration reference, as a man page.
    """
    from docutils.core import publish_string
    from docutils.parsers.rst import roles
    from docutils.writers import manpage

    roles.register_canonical_role("doc", cast(Any, _doc_role))
    body = re.sub(r"\A[^\n]*\n=+\n", "", rst)
    title = "ngrokd.yml"
    document = (
        f"{'=' * len(title)}\n{title}\n{'=' * len(title)}\n\n"
        "-----------------------------\n"
        "the configuration of ngrokd\n"
        "-----------------------------\n\n"
        ":Manual section: 5\n"
        f":Manual group: {_MANUAL}\n"
        f":Version: ngrokd {__version__}\n\n"
        "Description\n-----------\n\n" + body + _CONFIG_SEE_ALSO
    )
    out = publish_string(
        document,
        writer=manpage.Writer(),
        settings_overrides={"report_level": 2, "halt_level": 2},
    )
    return out.decode("utf-8") if isinstance(out, bytes) else str(out)


_CONFIG_SEE_ALSO = """

See also
--------

ngrokd(8), ngrokctl(1)
"""


def _doc_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: object,
    options: object = None,
    content: object = None,
) -> tuple[list[object], list[object]]:
    """
    Sphinx's C{:doc:} role, outside Sphinx: the document's name in the
    docs directory, as text.
    """
    from docutils import nodes

    return [nodes.emphasis(rawtext, f"docs/{text}.rst")], []


def render_all(directory: str, configuration_rst: str) -> list[str]:
    """
    Write the three pages under C{directory} (C{man1/ngrokctl.1}, ...),
    reading the configuration reference from C{configuration_rst}; the
    paths written.
    """
    with open(configuration_rst, encoding="utf-8") as f:
        rst = f.read()
    pages = {
        PAGES[0]: parser_page(
            ctl_parser.parser(),
            1,
            "ask and tell a running ngrokd",
            _CTL_SECTIONS,
        ),
        PAGES[1]: parser_page(
            daemon_parser.parser(),
            8,
            "reach ngrok's Kubernetes-bound endpoints by name from this machine",
            _DAEMON_SECTIONS,
        ),
        PAGES[2]: config_page(rst),
    }
    written = []
    for name, text in pages.items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written
