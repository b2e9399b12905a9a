"""
The C{ngrokd} and C{ngrokctl} command lines: their parsers (plain argparse,
importable without Twisted so that man pages and completions are made from
them at build time), the C{ngrokd} console script that runs the daemon or
installs it as a service, shell completion and the man pages.
"""
