# -*- test-case-name: ngrokd.test.test_instance -*-
"""
Several daemons on one host: what an instance name changes.

The unnamed instance (C{""}) keeps every default exactly as it always was.
A named one takes defaults derived from its name for everything that names
a place (state directory, config file, control socket, interface, hosts
section markers), each an injective function of the name, so two names never
meet. Numbers from a small space (the subnet, the first network port, the
health port) cannot be derived without two names colliding, so a named
instance must set those itself where they are used (see L{parse_config
<ngrokd.config.parse_config>}).
"""

from __future__ import annotations

import os
import re

#: The unnamed instance's state directory; a named one's is a child of it.
DEFAULT_STATE_DIR = "/etc/ngrokd"
#: The unnamed instance's control socket.
DEFAULT_SOCKET = "/var/run/ngrokd.sock"
#: The unnamed instance's interface.
DEFAULT_INTERFACE = "ngrokd0"
#: The longest interface name Linux takes (IFNAMSIZ less the NUL).
MAX_INTERFACE_NAME = 15
#: The longest instance name: short enough for file names and log lines.
MAX_NAME = 32

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


class InstanceNameError(ValueError):
    """
    An instance name that cannot name files, sockets and interfaces.
    """


def check_name(name: str) -> str:
    """
    C{name} if it is a usable instance name (C{""}: the unnamed instance).

    @raise InstanceNameError: saying what a name may hold.
    """
    if name and (len(name) > MAX_NAME or not _NAME.fullmatch(name)):
        raise InstanceNameError(
            f"must be at most {MAX_NAME} of a-z, 0-9 and '-', starting and"
            f" ending with a letter or digit, got {name!r}"
        )
    return name


def state_dir(name: str) -> str:
    """
    The state directory of instance C{name}.
    """
    return os.path.join(DEFAULT_STATE_DIR, name) if name else DEFAULT_STATE_DIR


def config_path(name: str) -> str:
    """
    The config file of instance C{name}: C{config.yml} in its state directory.
    """
    return os.path.join(state_dir(name), "config.yml")


def socket_path(name: str) -> str:
    """
    The control socket of instance C{name}.
    """
    return f"/var/run/ngrokd-{name}.sock" if name else DEFAULT_SOCKET


def interface_name(name: str) -> str | None:
    """
    The interface of instance C{name}; C{None} when C{ngrokd-NAME} is longer
    than Linux allows. Truncating instead would let two names share one.
    """
    if not name:
        return DEFAULT_INTERFACE
    derived = f"ngrokd-{name}"
    return derived if len(derived) <= MAX_INTERFACE_NAME else None


def hosts_markers(name: str) -> tuple[str, str]:
    """
    The lines that begin and end instance C{name}'s section of the hosts
    file. Each instance matches only its own lines, whole, so sections of
    several instances in one file never touch.
    """
    label = f"ngrokd-{name}" if name else "ngrokd"
    return f"# BEGIN {label} managed section", f"# END {label} managed section"


_MARKER = re.compile(r"# (?:BEGIN|END) ngrokd(?:-[a-z0-9-]+)? managed section")


def is_hosts_marker(line: str) -> bool:
    """
    Whether C{line} (stripped) begins or ends any instance's section.
    """
    return _MARKER.fullmatch(line) is not None
