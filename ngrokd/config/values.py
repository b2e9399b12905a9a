# -*- test-case-name: ngrokd.test.test_config -*-
"""
The checks of single values that are not addresses: strings, paths,
numbers, switches and names. Each is a pure function of one YAML node (and
the file's context) that returns the value or refuses it, naming the file,
line and key; L{ngrokd.config.schema} names the check of each key.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import yaml

from ngrokd import instance as _instance
from ngrokd.config.context import STR, Context, shown

#: Longer waits are mistakes (and huge integers do not fit a float).
_MAX_SECONDS = 1e9
#: A renewal margin longer than this is a mistake (certificates last a year).
_MAX_DAYS = 3650
#: A larger count limit is a mistake.
_MAX_COUNT = 1_000_000
#: Warm connections to the ingress: each is a socket and a TLS session.
_MAX_POOL = 1000
_LOG_LEVELS = {"debug", "info", "warn", "warning", "error", "critical"}
_LOG_FORMATS = ("text", "json")
#: Twisted server endpoint types a socket_path may name instead of a path.
_ENDPOINT_TYPES = ("unix:", "systemd:", "tcp:", "tcp6:")
#: How names may reach the system's resolver (C{dns.mode}).
DNS_MODES = ("auto", "resolved", "resolver-files", "hosts", "off")


def string(node: yaml.Node, key: str, ctx: Context) -> str:
    value = ctx.value(node, key)
    if not isinstance(value, str):
        hint = " (quote it to make it a string)" if value is not None else ""
        ctx.fail(node, key, f"must be a string, got {shown(node)}{hint}")
    return value


def secret(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    A string that must never be shown, not even when it is refused.
    """
    if not isinstance(node, yaml.ScalarNode) or node.tag != STR:
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        if isinstance(node, yaml.ScalarNode):
            kind = "a value of another type (quote it to make it a string)"
        ctx.fail(node, key, f"must be a string, got {kind}; the value is not shown")
    value: str = node.value
    if value and ctx.mode is not None and ctx.mode & 0o044:
        ctx.warn(
            node,
            key,
            f"the file is readable by group or others (mode {ctx.mode:04o}):"
            f" chmod 600 {ctx.path}, or give the key in NGROK_API_KEY",
        )
    return value


def nonempty(node: yaml.Node, key: str, ctx: Context) -> str:
    value = string(node, key, ctx)
    if not value:
        ctx.fail(node, key, "must not be empty")
    return value


def path(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    A file or directory; a relative one is relative to the config's directory.
    """
    value = nonempty(node, key, ctx)
    if "\0" in value:
        ctx.fail(node, key, f"must be a path, got {value!r}")
    return os.path.join(os.path.dirname(ctx.path), value)


def optional_path(node: yaml.Node, key: str, ctx: Context) -> str | None:
    return path(node, key, ctx) if string(node, key, ctx) else None


def seconds(node: yaml.Node, key: str, ctx: Context) -> float:
    return _number(node, key, ctx, zero=False, most=_MAX_SECONDS, unit="seconds")


def days(node: yaml.Node, key: str, ctx: Context) -> float:
    return _number(node, key, ctx, zero=True, most=_MAX_DAYS, unit="days")


def delay(node: yaml.Node, key: str, ctx: Context) -> float:
    return _number(node, key, ctx, zero=True, most=_MAX_SECONDS, unit="seconds")


def _number(
    node: yaml.Node, key: str, ctx: Context, zero: bool, most: float, unit: str
) -> float:
    """
    A number of C{unit}s, more than 0 (or C{zero} too), at most C{most}.
    """
    value = ctx.value(node, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 if zero else value > 0)
    ):
        kind = "a number of {}, 0 or more" if zero else "a positive number of {}"
        ctx.fail(node, key, f"must be {kind.format(unit)}, got {shown(node)}")
    if not value <= most:
        ctx.fail(node, key, f"must be at most {most:g} {unit}, got {value}")
    return float(value)


def poll_interval(node: yaml.Node, key: str, ctx: Context) -> float:
    value = seconds(node, key, ctx)
    if value < 5:
        ctx.warn(node, key, f"polling every {value:g}s may hit ngrok API rate limits")
    return value


def _whole(node: yaml.Node, key: str, ctx: Context, low: int, high: int) -> int:
    value = ctx.value(node, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        ctx.fail(node, key, f"must be a whole number {low}..{high}, got {shown(node)}")
    return value


def count(node: yaml.Node, key: str, ctx: Context) -> int:
    return _whole(node, key, ctx, 1, _MAX_COUNT)


def size(node: yaml.Node, key: str, ctx: Context) -> int:
    return _whole(node, key, ctx, 0, _MAX_POOL)


def count_or_none(node: yaml.Node, key: str, ctx: Context) -> int:
    return _whole(node, key, ctx, 0, _MAX_COUNT)


def boolean(node: yaml.Node, key: str, ctx: Context) -> bool:
    value = ctx.value(node, key)
    if not isinstance(value, bool):
        ctx.fail(node, key, f"must be true or false, got {shown(node)}")
    return value


def insecure(node: yaml.Node, key: str, ctx: Context) -> bool:
    value = boolean(node, key, ctx)
    if value:
        ctx.warn(node, key, "the binding ingress's certificate will NOT be verified")
    return value


def log_level(node: yaml.Node, key: str, ctx: Context) -> str:
    value = ctx.value(node, key)
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        levels = ", ".join(sorted(_LOG_LEVELS))
        ctx.fail(node, key, f"must be one of {levels}; got {shown(node)}")
    return "warn" if value.lower() == "warning" else value.lower()


def log_format(node: yaml.Node, key: str, ctx: Context) -> str:
    value = ctx.value(node, key)
    if value not in _LOG_FORMATS:
        ctx.fail(node, key, f"must be text or json; got {shown(node)}")
    return str(value)


def socket(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    A path for the control socket, or a Twisted server endpoint description
    (C{systemd:domain=UNIX:index=0} for socket activation).
    """
    value = nonempty(node, key, ctx)
    if value.startswith(_ENDPOINT_TYPES):
        return value
    return path(node, key, ctx)


def interface_name(node: yaml.Node, key: str, ctx: Context) -> str:
    value = nonempty(node, key, ctx)
    if len(value) > 15 or "/" in value or any(c.isspace() for c in value):
        ctx.fail(
            node,
            key,
            "must be an interface name of at most 15 characters without '/' "
            f"or spaces, got {value!r}",
        )
    return value


def instance_name(node: yaml.Node, key: str, ctx: Context) -> str:
    value = string(node, key, ctx)
    try:
        return _instance.check_name(value)
    except _instance.InstanceNameError as e:
        ctx.fail(node, key, str(e))


def selectors(node: yaml.Node, key: str, ctx: Context) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of strings, got {shown(node)}")
    return tuple(
        nonempty(item, f"{key}[{i}]", ctx) for i, item in enumerate(node.value)
    )


def dns_mode(node: yaml.Node, key: str, ctx: Context) -> str:
    value = ctx.value(node, key)
    if value is False:
        return "off"  # YAML 1.1 reads a bare off as false
    if not isinstance(value, str) or value.lower() not in DNS_MODES:
        modes = ", ".join(DNS_MODES)
        ctx.fail(node, key, f"must be one of {modes}; got {shown(node)}")
    return value.lower()


def api_url(node: yaml.Node, key: str, ctx: Context) -> str:
    value = nonempty(node, key, ctx)
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        ctx.fail(node, key, f"must be an http(s)://host URL, got {value!r}: {e}")
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or url.query
        or url.fragment
    ):
        ctx.fail(node, key, f"must be an http(s)://host URL, got {value!r}")
    return value.rstrip("/")
