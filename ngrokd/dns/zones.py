# -*- test-case-name: ngrokd.test.test_dns_names -*-
"""
The zones ngrokd serves alone: the routing domains a system resolver sends
to it, and under which it answers "no such name" itself.

The rule, for each name (a wildcard C{*.S} counts as S, everything under
which it answers):

    - a name under a public top-level domain (one in the Public Suffix
      List's ICANN section: C{com}, C{dev}, C{prod}, C{co.uk}'s C{uk}...) is
      its own zone: C{api.example.com} routes C{api.example.com} and the
      names under it, never C{example.com} or C{com}, whose other names
      belong to the public DNS;
    - a name under a top-level domain that other resolvers answer on
      ordinary machines and networks (L{SHARED_TLDS}: C{local} is mDNS's,
      C{lan} or C{internal} a home router's or a company's) is its own zone
      too, so that C{printer.lan} still reaches the router;
    - a name under any other top-level domain, one that is in no public or
      shared use, is served with that whole top-level domain:
      C{web.default} and C{db.default} give C{default}. The top-level
      domain, not a longer parent, so that Kubernetes-style names
      (C{NAME.NAMESPACE}) give one zone per namespace;
    - a zone under another zone is dropped: the outer one covers it.

The result is sorted, so that equal sets of names give equal tuples and the
caller can tell when the routing domains changed.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from ngrokd.names import public_suffixes

#: Top-level domains that are not public but that other resolvers answer:
#: claiming one whole would hide their names.
SHARED_TLDS = frozenset(
    {
        "local",  # mDNS (RFC 6762)
        "localhost",  # the machine itself (RFC 6761)
        "invalid",  # never resolves (RFC 6761)
        "home",
        "lan",
        "internal",
        "intranet",
        "corp",
        "private",
        "localdomain",
    }
)


def normalise(name: str) -> str:
    """
    C{name} as the table keys it: lower case, without a trailing dot.
    """
    return name.rstrip(".").lower()


def is_public_tld(label: str) -> bool:
    """
    Whether C{label} is a top-level domain of the public DNS.
    """
    return public_suffixes().publicsuffix(label) == label


def zone_for(name: str) -> str:
    """
    The zone that serves C{name} (a wildcard C{*.S} stands for S), by the
    rule above.
    """
    base = normalise(name).removeprefix("*.")
    tld = base.rsplit(".", 1)[-1]
    if tld in SHARED_TLDS or is_public_tld(tld):
        return base
    return tld


def parents(name: str) -> Iterable[str]:
    """
    The names above C{name}, nearest first: C{a.b.c} gives C{b.c}, C{c}.
    """
    labels = name.split(".")
    for i in range(1, len(labels)):
        yield ".".join(labels[i:])


def enclosing(name: str, zones: Container[str]) -> str | None:
    """
    The nearest of C{zones} that C{name} is in (itself included), or
    L{None}.
    """
    if name in zones:
        return name
    for parent in parents(name):
        if parent in zones:
            return parent
    return None


def routing_domains(names: Iterable[str]) -> tuple[str, ...]:
    """
    The fewest zones, none of them public, that together serve every one of
    C{names}.
    """
    zones = {zone_for(name) for name in names}
    return tuple(sorted(z for z in zones if not any(p in zones for p in parents(z))))
