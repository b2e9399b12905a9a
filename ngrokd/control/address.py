# -*- test-case-name: ngrokd.test.test_control -*-
"""
Where the control socket listens, read from C{server.socket_path}: a path,
or a Twisted server endpoint description.

A path and a C{unix:} description are one kind of socket: this daemon makes
it, mode C{0660} unless the description names another mode, with
C{server.socket_group}, replacing a dead daemon's socket and leaving a live
one's alone. C{tcp:} and C{tcp6:} listen on loopback unless the description
names an interface, and can serve reads only: over TCP the kernel cannot
say who connects. Anything else (C{systemd:}) goes to Twisted as it is.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.endpoints import _parse, quoteStringArgument

#: The mode of a control socket this daemon makes: its owner and group.
SOCKET_MODE = 0o660
#: The loopback address a TCP control socket listens on, by endpoint type.
_LOOPBACK = {"tcp": "127.0.0.1", "tcp6": "::1"}
#: The positional arguments of Twisted's C{unix:} and C{tcp:} descriptions.
_POSITIONAL = {
    "unix": ("address", "mode", "backlog", "lockfile"),
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
}


class AddressError(ValueError):
    """
    C{server.socket_path} cannot be listened on: the message says why.
    """


@frozen
class ControlAddress:
    """
    Where to listen.

    @ivar description: what Twisted listens on when C{path} is empty.
    @ivar path: the UNIX socket this daemon makes (C{""}: Twisted's endpoint).
    @ivar mode: the permissions of C{path}.
    @ivar mode_named: whether the description named C{mode}.
    @ivar backlog: the listen backlog of C{path}.
    @ivar tcp: over TCP, where nobody's credentials can be told.
    """

    description: str
    path: str = ""
    mode: int = SOCKET_MODE
    mode_named: bool = False
    backlog: int = 50
    tcp: bool = False


def control_address(value: str) -> ControlAddress:
    """
    Where C{server.socket_path} (C{value}) says to listen.

    @raise AddressError: a C{unix:} or C{tcp:} description that Twisted
        would refuse.
    """
    kind = value.partition(":")[0]
    if kind not in _POSITIONAL:
        return ControlAddress(value, path=value if value.startswith("/") else "")
    args, kwargs = _parse(value)
    names = _POSITIONAL[kind]
    if len(args) - 1 > len(names):
        raise AddressError(
            f"{value!r} has more fields than {kind}: takes ({', '.join(names)})"
        )
    fields = dict(zip(names, args[1:], strict=False))
    fields.update(kwargs)
    if kind == "unix":
        if not fields.get("address"):
            raise AddressError(f"{value!r} names no path")
        mode = fields.get("mode", "")
        try:
            return ControlAddress(
                value,
                path=fields["address"],
                mode=int(mode, 8) if mode else SOCKET_MODE,
                mode_named=bool(mode),
                backlog=int(fields.get("backlog", 50)),
            )
        except ValueError:
            raise AddressError(
                f"{value!r}: mode must be octal (e.g. 660), backlog a number"
            ) from None
    if not fields.get("interface"):  # Twisted's default is every interface
        value += ":interface=" + quoteStringArgument(_LOOPBACK[kind])
    return ControlAddress(value, tcp=True)
