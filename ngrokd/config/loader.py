# -*- test-case-name: ngrokd.test.test_config -*-
"""
Reading C{config.yml}: the YAML document, bounded in size and depth, with
the position of every node, walked section by section so that each known
key is read by the check its schema names and every unknown one is a
warning with a suggestion; every error names the file, the line and the
dotted key.

Parsing is a pure function of the text, the environment and the platform;
only L{load_config} and L{check_ca_bundles} read files.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from ngrokd import instance as _instance
from ngrokd.config.context import NULL, ConfigError, Context, join, pairs, shown
from ngrokd.config.derived import check_dns_listen, derive
from ngrokd.config.schema import SETTINGS, LoadedConfig, config_from
from ngrokd.pem import MAX_BUNDLE, PEMError, parse_certificates
from ngrokd.readfile import read_regular

#: The largest config file read, in characters: PyYAML composes a few
#: hundred kilobytes a second, and a real config is a few kilobytes.
MAX_CONFIG_SIZE = 256 * 1024
#: A character is at most 4 bytes of UTF-8: more bytes are over the limit.
MAX_CONFIG_BYTES = 4 * MAX_CONFIG_SIZE
#: Nesting deeper than this is refused before it is built (the settings
#: nest three deep; PyYAML recurses once per level).
MAX_DEPTH = 32
#: Unknown keys warned about one by one; more are counted in one warning.
_MAX_UNKNOWN = 20
#: Keys the Go ngrokd once read, with what replaced them.
_RETIRED = {
    "network_accessible": "no longer read; network access is chosen by "
    "net.listen_interface and net.overrides",
}
#: The sections of the file: a key with a dot is read inside its section.
_SECTIONS = {key.partition(".")[0] for key in SETTINGS if "." in key}


class _TooDeep(Exception):
    """
    The document nests deeper than L{MAX_DEPTH}, at C{line} under C{key}.
    """

    def __init__(self, line: int, key: str) -> None:
        super().__init__(line, key)
        self.line = line
        self.key = key


class _Loader(yaml.SafeLoader):
    """
    PyYAML's safe loader, refusing nesting deeper than L{MAX_DEPTH} before
    its recursion builds it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._keys: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if isinstance(index, yaml.ScalarNode):
            self._keys.append(f".{index.value}")
        elif isinstance(index, int):
            self._keys.append(f"[{index}]")
        else:
            self._keys.append("")
        try:
            if len(self._keys) > MAX_DEPTH:
                key = "".join(self._keys).lstrip(".")
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark.line + 1, key)
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()


def _suggestion(name: str, section: str) -> str | None:
    """
    A hint for an unknown key: what replaced it, or the closest known key at
    the same level, else anywhere.
    """
    if name in _RETIRED:
        return _RETIRED[name]
    everything = [*SETTINGS, *sorted(_SECTIONS)]
    here = [k for k in everything if k.rpartition(".")[0] == section]
    for pool in (here, everything):
        leaves = {k.rpartition(".")[2]: k for k in pool}
        close = difflib.get_close_matches(name, list(leaves), n=1)
        if close:
            return f"did you mean {leaves[close[0]]}?"
    return None


def _read(root: yaml.Node, ctx: Context) -> dict[str, Any]:
    """
    Every known key present (and not null) in the document, checked, by
    dotted name; unknown keys become warnings.
    """
    if not isinstance(root, yaml.MappingNode):
        ctx.fail(root, "", f"the file must be a mapping of settings, got {shown(root)}")
    found: dict[str, Any] = {}
    unknown = 0

    def take(section: str, name_node: yaml.ScalarNode, value_node: yaml.Node) -> None:
        nonlocal unknown
        key = join(section, name_node.value)
        if key not in SETTINGS or key.rpartition(".")[0] != section:
            unknown += 1
            if unknown <= _MAX_UNKNOWN:
                hint = _suggestion(name_node.value, section)
                message = "unknown key, ignored" + (f" ({hint})" if hint else "")
                ctx.warn(name_node, key, message)
        elif value_node.tag != NULL:
            found[key] = SETTINGS[key].check(value_node, key, ctx)
            ctx.locations[key] = ctx.where(name_node, key)

    for name_node, value_node in pairs(root, "", ctx):
        section = name_node.value
        if section not in _SECTIONS:
            take("", name_node, value_node)
        elif value_node.tag != NULL:
            for pair in pairs(value_node, section, ctx):
                take(section, *pair)
    if unknown > _MAX_UNKNOWN:
        ctx.warn(root, "", f"{unknown - _MAX_UNKNOWN} more unknown keys, ignored")
    return found


def parse_config(
    text: str,
    path: str,
    environ: Mapping[str, str],
    platform: str,
    mode: int | None = None,
    instance: str | None = None,
) -> LoadedConfig:
    """
    The configuration in C{text}, the contents of the file at C{path}.

    A key that is absent or null takes its default. C{NGROK_API_KEY} in
    C{environ} is the API key when the file gives none; C{NGROKD_HOSTS_PATH}
    replaces C{net.hosts_file}. C{platform} is a C{sys.platform} value: on
    C{"darwin"} the default subnet is 127.0.0.0/8. C{mode}, the file's
    permission bits, makes an API key in a file others can read a warning.
    C{instance}, the C{--instance} option, replaces C{server.instance}; a
    named instance derives the defaults in L{ngrokd.instance} and must set
    the numbers it uses (L{ngrokd.config.derived}).

    @raise ConfigError: naming the file, line and key of the first bad value.
    """
    if instance is not None:
        try:
            _instance.check_name(instance)
        except _instance.InstanceNameError as e:
            raise ConfigError(f"--instance: {e}") from None
    ctx = Context(path, platform, mode)
    if len(text) > MAX_CONFIG_SIZE:
        raise _too_large(path)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as e:
        where = f"{path}:{e.line}: {e.key}" if e.key else f"{path}:{e.line}"
        raise ConfigError(
            f"{where}: nested more than {MAX_DEPTH} levels deep"
        ) from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(
            f"{path}:{line}: not valid YAML: {e.problem}{context}"
        ) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        problem = f"character #x{e.character:04x}: {e.reason}"
        raise ConfigError(f"{path}:{line}: not valid YAML: {problem}") from None
    found = {} if root is None else _read(root, ctx)
    config = config_from(path, {**found, **derive(ctx, found, environ, instance)})
    check_dns_listen(ctx, config)
    return LoadedConfig(config, tuple(ctx.warnings), ctx.locations)


def _too_large(path: str) -> ConfigError:
    return ConfigError(
        f"{path}: larger than {MAX_CONFIG_SIZE} characters; a config file"
        " holds a few settings"
    )


def default_config(
    path: str, environ: Mapping[str, str], platform: str
) -> LoadedConfig:
    """
    The configuration of an empty file at C{path}.
    """
    return parse_config("", path, environ, platform)


def load_config(
    path: str,
    environ: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    instance: str | None = None,
) -> LoadedConfig:
    """
    Read and parse the file at C{path} (made absolute, so that relative paths
    in it stay right if the process changes directory), as instance
    C{instance} when given (see L{parse_config}).

    @raise ConfigError: the file cannot be read, or see L{parse_config}.
    """
    path = os.path.abspath(path)
    data, status = read_config_file(path)
    mode = stat.S_IMODE(status.st_mode)
    loaded = parse_config(
        config_text(data, path), path, environ, platform, mode, instance
    )
    check_ca_bundles(loaded)
    return loaded


def read_config_file(path: str) -> tuple[bytes, os.stat_result]:
    """
    The bytes and status of the config file at C{path} (through a symbolic
    link), refusing one that is not a regular file (a FIFO would block) or
    is too large.

    @raise ConfigError: naming C{path}.
    """
    try:
        data, status = read_regular(path, MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}")
    check_config_size(data, path)
    return data, status


def check_config_size(data: bytes, path: str) -> None:
    """
    @raise ConfigError: C{data}, the file at C{path}, is surely over
        L{MAX_CONFIG_SIZE} characters.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise _too_large(path)


def config_text(data: bytes, path: str) -> str:
    """
    The text of the config file at C{path}, whose bytes are C{data}.

    @raise ConfigError: it is not UTF-8, naming where.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}")


def check_ca_bundles(loaded: LoadedConfig) -> None:
    """
    Refuse a CA bundle the config names but that cannot be read or holds
    no certificate, naming the file, line and key, as any other bad value.
    """
    config = loaded.config
    for key, path in (
        ("api.ca_bundle", config.api.ca_bundle),
        ("ingress.ca_bundle", config.ingress.ca_bundle),
    ):
        if not path:
            continue
        try:
            pem, _ = read_regular(path, MAX_BUNDLE + 1)
        except OSError as e:
            raise ConfigError(
                f"{loaded.where(key)}: cannot read {path}: {e.strerror or e}"
            ) from None
        if len(pem) > MAX_BUNDLE:
            raise ConfigError(
                f"{loaded.where(key)}: {path} is larger than"
                f" {MAX_BUNDLE // 2**20} MiB: not a CA bundle"
            )
        try:
            parse_certificates(pem, path)
        except PEMError as e:
            raise ConfigError(f"{loaded.where(key)}: {e}") from None
