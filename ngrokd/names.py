# -*- test-case-name: ngrokd.test.test_names -*-
"""
Which names ngrokd may claim on this machine.

In virtual mode an endpoint's hostname is made to resolve to an address of
ngrokd's (today by a line in the hosts file). The name comes from the ngrok
API, which we do not control, and a well-formed DNS name can still belong to
someone else here; claiming it would take it from them:

 - C{localhost} and every name under it (RFC 6761): this machine itself.
 - a numeric name: an IP literal, or one a resolver reads as an address
   before it reads any file (C{192.0.2.77}, C{127.1}, C{0x7f.1}).
 - the hosts of the ngrok API and of the binding ingress: ngrokd would cut
   itself off from ngrok.
 - a name the hosts file sets outside this instance's section (the
   administrator's, or another instance's): the name would then have two
   addresses, and C{getaddrinfo} sorts ngrokd's, on a local link, first.
 - a name outside C{net.allowed_domains}, when that is set.

A wildcard (C{*.apps.prod}) claims every name under its suffix: the rules
apply to the suffix, and a wildcard over a public suffix (C{*.prod},
C{*.co.uk}) is refused, as it would take a whole part of the public DNS.

L{refusal} is the one rule for all of them, a pure function of the name and
L{NameRules}: whatever makes names resolve (the hosts file, the DNS
server's table) applies it, and says its answer as the endpoint's reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from ipaddress import ip_address
from types import MappingProxyType
from urllib.parse import urlsplit

from attrs import field, frozen
from publicsuffixlist import PublicSuffixList

from ngrokd.config import Config

#: One label as C{inet_aton} reads a number: decimal, octal or hexadecimal.
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
#: A label of digits alone: no top-level domain is all-numeric (RFC 3696).
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
#: How many allowed domains a reason lists before it counts the rest.
_SHOWN_DOMAINS = 3


def _frozen_mapping(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@frozen
class NameRules:
    """
    The facts beside a name that decide whether ngrokd may claim it.

    @ivar reserved: hosts ngrokd itself must reach, lowercase, each with
        what it is (for the reason).
    @ivar pinned: the names the hosts file sets outside this instance's
        section, lowercase.
    @ivar allowed_domains: the domains names must be in (C{net.allowed_domains},
        lowercase); empty: any.
    """

    reserved: Mapping[str, str] = field(
        factory=dict, converter=_frozen_mapping, hash=False
    )
    pinned: AbstractSet[str] = frozenset()
    allowed_domains: tuple[str, ...] = ()


#: No facts: only the rules of the name alone (localhost, numeric) apply.
NO_FACTS = NameRules()


def name_rules(config: Config, pinned: AbstractSet[str] = frozenset()) -> NameRules:
    """
    The rules for C{config}: its API and ingress hosts are reserved, its
    C{net.allowed_domains} apply; C{pinned} is what the hosts file sets.
    """
    api_host = urlsplit(config.api.url).hostname or ""
    reserved = {
        config.ingress.host.lower(): "the binding ingress's host (ingressEndpoint)",
        api_host.lower(): "the ngrok API's host (api.url)",
    }
    return NameRules(reserved, pinned, config.net.allowed_domains)


@functools.cache
def public_suffixes() -> PublicSuffixList:
    """
    The Public Suffix List's ICANN section (a private registry such as
    C{github.io} sits under a public suffix anyway), read once from the
    package's own copy.
    """
    return PublicSuffixList(only_icann=True, accept_unknown=False)


def is_numeric(name: str) -> bool:
    """
    Whether C{name} (lowercase) reads as an IP address: an IPv4 or IPv6
    literal, a name whose last label is all digits, or one made only of
    the numbers C{inet_aton} accepts (C{2130706433}, C{0x7f.0.0.1}).
    """
    labels = name.split(".")
    if _DIGITS.fullmatch(labels[-1]) or all(_NUMBER.fullmatch(x) for x in labels):
        return True
    if ":" not in name:
        return False  # an IPv4 literal ends in digits; IPv6 needs a colon
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


def in_domains(name: str, domains: tuple[str, ...]) -> bool:
    """
    Whether C{name} is one of C{domains} or under one of them.
    """
    return any(name == domain or name.endswith(f".{domain}") for domain in domains)


def refusal(name: str, rules: NameRules) -> str | None:
    """
    Why ngrokd may not claim C{name} on this machine, or C{None} when it may.
    """
    name = name.lower().removesuffix(".")
    suffix = name.removeprefix("*.")
    if suffix != name and public_suffixes().is_public(suffix):
        why: str | None = (
            f"a wildcard over {suffix}, a public suffix, would take every name"
            " under it from the DNS"
        )
    else:
        # A wildcard gives its suffix itself no address: a line for it
        # in the hosts file is no second address of the same name.
        why = _why(suffix, rules, exact=suffix == name)
    return None if why is None else f"{name} is not ngrokd's to claim: {why}"


def _why(name: str, rules: NameRules, exact: bool) -> str | None:
    if name == "localhost" or name.endswith(".localhost"):
        return "it names this machine itself (RFC 6761)"
    if is_numeric(name):
        return "it reads as an IP address, not a name"
    reserved = rules.reserved.get(name)
    if reserved is not None:
        return f"it is {reserved}, which ngrokd must reach"
    domains = rules.allowed_domains
    if domains and not in_domains(name, domains):
        shown = ", ".join(domains[:_SHOWN_DOMAINS])
        if len(domains) > _SHOWN_DOMAINS:
            shown += f" and {len(domains) - _SHOWN_DOMAINS} more"
        return f"it is outside net.allowed_domains ({shown})"
    if exact and name in rules.pinned:
        return "the hosts file sets it outside ngrokd's section, and that address stays"
    return None
