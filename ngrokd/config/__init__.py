# -*- test-case-name: ngrokd.test.test_config -*-
"""
The daemon's settings: C{config.yml} read into frozen values.

The keys and defaults are the Go ngrokd's, so its config files keep working.
Unlike the original, every value is checked when the file is loaded (the
original checked only on reload, and panicked on some values), a key that is
present is honoured even when it is zero or empty, and every error or warning
names the file, the line and the dotted key, so a bad edit is refused with a
message that says where to look.

The parts: L{schema}, the values and every key, each declared once;
L{values} and L{addresses}, the checks of single values; L{loader}, the
file read into them; L{derived}, the defaults that follow the instance, the
platform or the environment, and the rules across keys.
"""

from ngrokd.config.addresses import SUBNET6_AUTO, SUBNET6_OFF
from ngrokd.config.context import ConfigError
from ngrokd.config.loader import (
    MAX_CONFIG_SIZE,
    MAX_DEPTH,
    check_ca_bundles,
    default_config,
    load_config,
    parse_config,
)
from ngrokd.config.schema import (
    SETTINGS,
    ApiConfig,
    Config,
    DiscoveryConfig,
    DnsConfig,
    IngressConfig,
    LoadedConfig,
    NetConfig,
    ServerConfig,
    Setting,
)
from ngrokd.config.values import DNS_MODES

__all__ = [
    "DNS_MODES",
    "MAX_CONFIG_SIZE",
    "MAX_DEPTH",
    "SETTINGS",
    "SUBNET6_AUTO",
    "SUBNET6_OFF",
    "ApiConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "DnsConfig",
    "IngressConfig",
    "LoadedConfig",
    "NetConfig",
    "ServerConfig",
    "Setting",
    "check_ca_bundles",
    "default_config",
    "load_config",
    "parse_config",
]
