# -*- test-case-name: ngrokd.test.test_config -*-
"""
What every check of a value needs: where its node is in the file, and how
to refuse it or warn about it there, so that every message names the file,
the line and the dotted key the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import attrs
import yaml
from yaml.constructor import SafeConstructor

NULL = "tag:yaml.org,2002:null"
STR = "tag:yaml.org,2002:str"
MERGE = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """
    The configuration file cannot be read or holds a value ngrokd refuses.
    """


@attrs.define
class Context:
    """
    What the checks need: where the file is, its permission bits (when
    known), the platform, and where to put warnings.
    """

    path: str
    platform: str
    mode: int | None = None
    warnings: list[str] = attrs.Factory(list)
    locations: dict[str, str] = attrs.Factory(dict)
    constructor: SafeConstructor = attrs.Factory(SafeConstructor)

    def where(self, node: yaml.Node, key: str) -> str:
        """
        C{"FILE:LINE: KEY"} for C{node}, C{"FILE:LINE"} without a key.
        """
        where = f"{self.path}:{node.start_mark.line + 1}"
        return f"{where}: {key}" if key else where

    def fail(self, node: yaml.Node, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.where(node, key)}: {message}")

    def warn(self, node: yaml.Node, key: str, message: str) -> None:
        self.warnings.append(f"{self.where(node, key)}: {message}")

    def value(self, node: yaml.Node, key: str) -> object:
        """
        The Python value of a scalar node.
        """
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as e:
            self.fail(node, key, f"cannot read the value: {e}")


#: A key's check: its value node, its dotted key and the context in, the
#: value out, or L{ConfigError} naming the file, line and key.
Check = Callable[[yaml.Node, str, Context], Any]


def shown(node: yaml.Node) -> str:
    """
    A node as a message shows it: a string quoted, a list or mapping named.
    """
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if node.tag == NULL:
        return "null"
    return repr(node.value) if node.tag == STR else str(node.value)


def join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def pairs(
    node: yaml.Node, key: str, ctx: Context
) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """
    The key and value nodes of a mapping, refusing duplicate and merge keys.
    """
    if not isinstance(node, yaml.MappingNode):
        ctx.fail(node, key, f"must be a mapping, got {shown(node)}")
    lines: dict[str, int] = {}
    for name_node, _ in node.value:
        if not isinstance(name_node, yaml.ScalarNode) or name_node.tag == MERGE:
            ctx.fail(name_node, key, "keys must be plain names (no lists or << merges)")
        name = name_node.value
        if name in lines:
            ctx.fail(
                name_node,
                join(key, name),
                f"duplicate key (first on line {lines[name]})",
            )
        lines[name] = name_node.start_mark.line + 1
    found: list[tuple[yaml.ScalarNode, yaml.Node]] = node.value
    return found
