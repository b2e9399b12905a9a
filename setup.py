"""
The man pages, made at build time from the parsers and
docs/configuration.rst (ngrokd/cli/manpages.py) and installed under
share/man; everything else is declared in setup.cfg.
"""

import os
import sys

from setuptools import Command, setup
from setuptools.command.build import build

HERE = os.path.dirname(os.path.abspath(__file__))
MAN = os.path.join("build", "man")
PAGES = {
    "share/man/man1": "man1/ngrokctl.1",
    "share/man/man8": "man8/ngrokd.8",
    "share/man/man5": "man5/ngrokd.yml.5",
}


class BuildMan(Command):
    description = "make the man pages from the parsers and the config reference"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        sys.path.insert(0, HERE)
        try:
            from ngrokd.cli.manpages import render_all
        finally:
            sys.path.remove(HERE)
        render_all(
            os.path.join(HERE, MAN), os.path.join(HERE, "docs", "configuration.rst")
        )


class BuildWithMan(build):
    sub_commands = [("build_man", None), *build.sub_commands]


setup(
    cmdclass={"build": BuildWithMan, "build_man": BuildMan},
    data_files=[(target, [os.path.join(MAN, page)]) for target, page in PAGES.items()],
)
