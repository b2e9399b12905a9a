# -*- test-case-name: ngrokd.test.test_hosts -*-
"""
The ngrokd section of a hosts file, as text: what the file holds once the
section holds the names (L{render}), and the names set outside it
(L{pinned_names}). Pure functions, so that the rules of a file that belongs
to the administrator are checked without one; L{ngrokd.host.hostsfile}
writes what they decide.

ngrokd owns only the lines between its two marker lines. Everything else is
kept byte for byte, even when the section is damaged: the original deleted
the rest of the file when its END marker was missing, and matched markers
as substrings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address

from ngrokd.host.allocator import IPAddress
from ngrokd.instance import hosts_markers, is_hosts_marker

#: The unnamed instance's markers; a named one's carry its name.
BEGIN, END = hosts_markers("")

#: A name's addresses for its lines: one address, or several (IPv4, IPv6).
Addresses = IPAddress | tuple[IPAddress, ...]

_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_ENTRY = re.compile(r"(\S+)\t(\S+)")


def _lines(text: str) -> list[str]:
    """
    C{text} split after each newline, line endings kept: only C{\\n} ends a
    line in a hosts file (unlike L{str.splitlines}).
    """
    return _LINE.findall(text)


def _ending(line: str) -> str:
    for ending in ("\r\n", "\n"):
        if line.endswith(ending):
            return ending
    return ""


def _content(line: str) -> str:
    return line[: len(line) - len(_ending(line))]


def _is_entry(line: str) -> bool:
    match = _ENTRY.fullmatch(_content(line))
    if match is None:
        return False
    try:
        ip_address(match.group(1))
    except ValueError:
        return False
    return True


def _is_blank(line: str) -> bool:
    return _content(line) == "" and line != ""


def _sections(lines: list[str], begin: str, end_: str) -> list[tuple[int, int]]:
    """
    The C{[start, end)} line ranges that are this instance's: from a BEGIN line to
    the next END line; or, when another BEGIN or the end of the file comes
    first, the BEGIN line and the entry lines right after it (what the
    original wrote before it was cut short). A stray END line is a section of
    its own. Another instance's marker line ends an unfinished section, so
    no instance's section ever takes in another's.
    """
    markers = [_content(line).strip() for line in lines]
    sections: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if markers[i] == end_:
            sections.append((i, i + 1))
            i += 1
        elif markers[i] == begin:
            j = i + 1
            while j < len(lines) and not is_hosts_marker(markers[j]):
                j += 1
            if j < len(lines) and markers[j] == end_:
                end = j + 1
            else:
                end = i + 1
                while end < len(lines) and _is_entry(lines[end]):
                    end += 1
            sections.append((i, end))
            i = end
        else:
            i += 1
    return sections


def render(existing: str, mapping: Mapping[str, Addresses], instance: str = "") -> str:
    """
    C{existing} hosts-file text with the section of ngrokd instance
    C{instance} holding exactly C{mapping}: one C{IP<TAB>hostname} line per
    address of each hostname, sorted by hostname (IPv4 before IPv6). Other
    instances' sections are other text.

    The section stays where it was (several collapse into the first). A new
    one is appended after a blank line. An empty mapping removes the section
    together with the blank line before it, so that adding and then removing
    a section gives back the original text, byte for byte, including a
    missing final newline. The section's lines end like its BEGIN line did,
    or a new section's like the file's first line (CRLF or LF).
    """
    lines = _lines(existing)
    newline = next((_ending(line) for line in lines if _ending(line)), "\n")
    begin, end_ = hosts_markers(instance)
    sections = _sections(lines, begin, end_)

    def is_begin(line: str) -> bool:
        return _content(line).strip() == begin

    keep = None
    if mapping:
        keep = next((s for s in sections if is_begin(lines[s[0]])), None)
    out: list[str] = []
    position = 0
    for start, end in sections:
        out.extend(lines[position:start])
        position = end
        last_ending = _ending(lines[end - 1])
        if (start, end) == keep:
            own = _ending(lines[start]) or newline
            out.extend(_section(mapping, own, last_ending, instance))
            continue
        if is_begin(lines[start]) and out and _is_blank(out[-1]):
            out.pop()
        if not last_ending and out:
            out[-1] = _content(out[-1])
    out.extend(lines[position:])
    if mapping and keep is None:
        last_ending = newline
        if out and not _ending(out[-1]):
            out[-1] += newline
            last_ending = ""
        if out:
            out.append(newline)
        out.extend(_section(mapping, newline, last_ending, instance))
    return "".join(out)


def _section(
    mapping: Mapping[str, Addresses], newline: str, last_ending: str, instance: str
) -> list[str]:
    begin, end = hosts_markers(instance)
    entries = [
        f"{ip}\t{hostname}{newline}"
        for hostname in sorted(mapping)
        for ip in each_address(mapping[hostname])
    ]
    return [begin + newline, *entries, end + last_ending]


def each_address(
    addresses: Addresses | str | Iterable[IPAddress | str],
) -> list[IPAddress]:
    """
    The addresses of a name, IPv4 first.
    """
    if isinstance(addresses, IPv4Address | IPv6Address | str):
        addresses = (addresses,)
    return sorted((ip_address(ip) for ip in addresses), key=lambda ip: ip.version)


def pinned_names(existing: str, instance: str = "") -> frozenset[str]:
    """
    The names C{existing} hosts-file text sets outside the section of ngrokd
    instance C{instance}, lowercase: those of the administrator's lines and
    of other instances' sections. Every name of a line counts, aliases too,
    and a line counts even when its address is not one, since its writer
    meant the name.
    """
    lines = _lines(existing)
    begin, end = hosts_markers(instance)
    names: set[str] = set()
    position = 0
    for start, stop in [*_sections(lines, begin, end), (len(lines), len(lines))]:
        for line in lines[position:start]:
            fields = line.partition("#")[0].split()
            names.update(name.lower().removesuffix(".") for name in fields[1:])
        position = stop
    return frozenset(names)
