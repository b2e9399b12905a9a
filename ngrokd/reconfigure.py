# -*- test-case-name: ngrokd.test.test_reload -*-
"""
What a changed configuration means for a running daemon: which changed keys
apply at once, which wait for a restart.

Keys are the config file's dotted names. A key is hot when the daemon can
take its new value without dropping what it serves; every other key (the
subnet, the interface, files and sockets it holds open, where the ingress
is and whether it is verified) is restart-only: a reload reports it by name
and leaves its old value in force, so nothing is half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from attrs import frozen

from ngrokd.config import Config

#: The keys a reload applies at once.
HOT = frozenset(
    {
        "api.url",
        "api.key",
        "api.ca_bundle",
        "api.timeout",
        "api.reregister_if_deleted",
        "ingress.ca_bundle",
        "ingress.connect_timeout",
        "ingress.upgrade_timeout",
        "ingress.pool_size",
        "ingress.pool_idle_timeout",
        "ingress.pool_max_age",
        "ingress.pool_linger",
        "ingress.early_data",
        "server.log_level",
        "server.renew_before_days",
        "server.shutdown_grace",
        "server.metrics_per_endpoint",
        "bound_endpoints.poll_interval",
        "bound_endpoints.selectors",
        "bound_endpoints.max_endpoints",
        "bound_endpoints.poll_timeout",
        "net.listen_interface",
        "net.overrides",
        "net.start_port",
        "net.reuse_after",
        "net.allowed_domains",
        "dns.mode",
        "dns.listen",
        "dns.upstreams",
    }
)

#: Keys whose values are never written to a log.
SECRET = frozenset({"api.key"})

#: The sections of L{Config}, named as in the config file.
_SECTIONS = ("api", "ingress", "server", "bound_endpoints", "net", "dns")
#: Keys whose file name differs from their place in L{Config}.
_RENAMED = {"ingress.endpoint": "ingressEndpoint"}


def settings(config: Config) -> dict[str, Any]:
    """
    Every setting of C{config}, by the config file's dotted key.
    """
    found: dict[str, Any] = {}
    for section in _SECTIONS:
        values = attrs.asdict(getattr(config, section), recurse=False)
        for name, value in values.items():
            key = f"{section}.{name}"
            found[_RENAMED.get(key, key)] = value
    return found


@frozen
class Changes:
    """
    The keys whose values differ, as (old, new), split by when they apply.
    """

    hot: Mapping[str, tuple[Any, Any]]
    restart: Mapping[str, tuple[Any, Any]]

    def __bool__(self) -> bool:
        return bool(self.hot or self.restart)

    def described(self) -> list[str]:
        """
        One line per changed key, secrets named but not shown.
        """
        lines = []
        for key, (old, new) in sorted({**self.hot, **self.restart}.items()):
            when = "" if key in self.hot else " (needs a restart)"
            if key in SECRET:
                lines.append(f"{key} changed{when}")
            else:
                lines.append(f"{key}: {_shown(old)} -> {_shown(new)}{when}")
        return lines


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "(empty)" if value in ("", None) else str(value)


def changes(running: Config, loaded: Config) -> Changes:
    """
    What differs from the C{running} configuration in the C{loaded} one.
    """
    old, new = settings(running), settings(loaded)
    differ = {key: (old[key], new[key]) for key in old if old[key] != new[key]}
    return Changes(
        hot={k: v for k, v in differ.items() if k in HOT},
        restart={k: v for k, v in differ.items() if k not in HOT},
    )


def applied(running: Config, loaded: Config) -> Config:
    """
    The configuration to run with after a reload: C{running} with the hot
    keys of C{loaded}; restart-only keys keep their running values.
    """
    result = running
    new = settings(loaded)
    for key in HOT:
        section, _, name = key.partition(".")
        part = getattr(result, section)
        if getattr(part, name) != new[key]:
            part = attrs.evolve(part, **{name: new[key]})
            result = attrs.evolve(result, **{section: part})
    return result
