"""
Tests for L{ngrokd.config}: the Go ngrokd's config files load with the same
meaning, and every bad value is refused with the file, line and key.
"""

from __future__ import annotations

import ipaddress
import operator
import os
import re
from textwrap import dedent
from typing import Any

import attrs
import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.config import addresses
from ngrokd.config.context import ConfigError, Context
from ngrokd.config.loader import (
    MAX_CONFIG_SIZE,
    MAX_DEPTH,
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
)
from ngrokd.config.values import DNS_MODES
from ngrokd.test.helpers import source_file

PATH = "/etc/ngrokd/config.yml"

#: The "Configuration" section of the Go ngrokd's documentation, verbatim.
ORIGINAL_EXAMPLE = """\
api:
  url: https://api.ngrok.com
  key: ""  # Auto-saved via ngrokctl set-api-key

ingressEndpoint: "kubernetes-binding-ingress.ngrok.io:443"

server:
  log_level: info
  socket_path: /var/run/ngrokd.sock
  client_cert: /etc/ngrokd/tls.crt
  client_key: /etc/ngrokd/tls.key

bound_endpoints:
  poll_interval: 30
  selectors: ['true']

net:
  interface_name: ngrokd0
  subnet: 10.107.0.0/16  # Auto-uses 127.0.0.0/8 on macOS
  listen_interface: "virtual"
  start_port: 9080
  overrides:
    hostname: "0.0.0.0"  # Per-endpoint override
"""


def parse(
    text: str, environ: dict[str, str] | None = None, platform: str = "linux"
) -> LoadedConfig:
    return parse_config(dedent(text), PATH, environ or {}, platform)


class ConfigTestCase(SynchronousTestCase):
    """
    Assertions on what L{parse_config} refuses.
    """

    def assertRefused(self, text: str, expected: str) -> None:
        """
        C{text} is refused with exactly C{expected} after the file name.
        """
        error = self.assertRaises(ConfigError, parse, text)
        self.assertEqual(str(error), f"{PATH}:{expected}")


class OriginalConfigTests(SynchronousTestCase):
    """
    Config files written for the Go ngrokd keep their meaning.
    """

    def test_documentedExample(self) -> None:
        """
        The example in the original's documentation loads with exactly the
        values it documents, and nothing to warn about.
        """
        loaded = parse_config(ORIGINAL_EXAMPLE, PATH, {}, "linux")
        self.assertEqual(
            loaded,
            LoadedConfig(
                Config(
                    path=PATH,
                    api=ApiConfig("https://api.ngrok.com", "", None),
                    ingress=IngressConfig(
                        "kubernetes-binding-ingress.ngrok.io:443",
                        None,
                        False,
                        10.0,
                        10.0,
                    ),
                    server=ServerConfig(
                        "info",
                        "/var/run/ngrokd.sock",
                        "/etc/ngrokd",
                        "/etc/ngrokd/tls.crt",
                        "/etc/ngrokd/tls.key",
                    ),
                    bound_endpoints=DiscoveryConfig(30.0, ("true",)),
                    net=NetConfig(
                        "ngrokd0",
                        ipaddress.IPv4Network("10.107.0.0/16"),
                        "virtual",
                        9080,
                        {"hostname": "0.0.0.0"},
                        "/etc/hosts",
                    ),
                ),
                (),
            ),
        )

    def test_documentedExampleEqualsDefaults(self) -> None:
        """
        Every value in the documented example is the default, so an empty file
        means the same thing, apart from the example's one override.
        """
        example = parse_config(ORIGINAL_EXAMPLE, PATH, {}, "linux").config
        defaults = default_config(PATH, {}, "linux").config
        self.assertEqual(
            attrs.evolve(example, net=attrs.evolve(example.net, overrides={})),
            defaults,
        )

    def test_goIndentation(self) -> None:
        """
        The four-space indentation Go's YAML encoder writes is read the same.
        """
        config = parse(
            """\
            net:
                subnet: 10.108.0.0/16
                overrides: {}
            """
        ).config
        self.assertEqual(config.net.subnet, ipaddress.IPv4Network("10.108.0.0/16"))


class DefaultTests(ConfigTestCase):
    """
    Absent keys take the original's defaults; present ones are honoured even
    when zero or empty.
    """

    def test_emptyFile(self) -> None:
        """
        An empty file, or one holding only comments, is all defaults with no
        warning, the same as L{default_config}.
        """
        defaults = default_config(PATH, {}, "linux")
        self.assertEqual(defaults.warnings, ())
        self.assertEqual(parse(""), defaults)
        self.assertEqual(parse("# nothing here\n\n   # still nothing\n"), defaults)

    def test_defaultValues(self) -> None:
        """
        The defaults are the Go ngrokd's, plus the new keys' own.
        """
        config = default_config(PATH, {}, "linux").config
        self.assertEqual(
            (config.path, config.api, config.ingress, config.bound_endpoints),
            (
                PATH,
                ApiConfig("https://api.ngrok.com", "", None),
                IngressConfig(
                    "kubernetes-binding-ingress.ngrok.io:443", None, False, 10.0, 10.0
                ),
                DiscoveryConfig(30.0, ("true",)),
            ),
        )
        self.assertEqual(
            config.server,
            ServerConfig(
                "info",
                "/var/run/ngrokd.sock",
                "/etc/ngrokd",
                "/etc/ngrokd/tls.crt",
                "/etc/ngrokd/tls.key",
            ),
        )
        self.assertEqual(
            config.net,
            NetConfig(
                "ngrokd0",
                ipaddress.IPv4Network("10.107.0.0/16"),
                "virtual",
                9080,
                {},
                "/etc/hosts",
            ),
        )

    def test_nullIsAbsent(self) -> None:
        """
        A key or section given no value (C{key:} or C{~}) takes its default.
        """
        loaded = parse(
            """\
            api:
            net:
              overrides:
              start_port: ~
            """
        )
        self.assertEqual(loaded, default_config(PATH, {}, "linux"))

    def test_explicitEmptyValues(self) -> None:
        """
        An empty list, mapping or string, and C{false}, are honoured rather
        than replaced by the default.
        """
        config = parse(
            """\
            api:
              key: ""
              ca_bundle: ""
            ingress:
              insecure_skip_verify: false
            bound_endpoints:
              selectors: []
            net:
              overrides: {}
            """
        ).config
        self.assertEqual(config.api.key, "")
        self.assertIsNone(config.api.ca_bundle)
        self.assertFalse(config.ingress.insecure_skip_verify)
        self.assertEqual(config.bound_endpoints.selectors, ())
        self.assertEqual(config.net.overrides, {})

    def test_zeroRefused(self) -> None:
        """
        Zero is never silently replaced by a default: where it means nothing
        (an interval, a timeout, a port), it is refused.
        """
        for key, expected in [
            ("ingress.connect_timeout", "must be a positive number of seconds"),
            ("ingress.upgrade_timeout", "must be a positive number of seconds"),
            ("ingress.dial_queue_timeout", "must be a positive number of seconds"),
            ("ingress.max_pending_dials", "must be a whole number 1..1000000"),
            ("server.shutdown_grace", "must be a positive number of seconds"),
            ("server.idle_timeout", "must be a positive number of seconds"),
            ("bound_endpoints.poll_interval", "must be a positive number of seconds"),
            ("net.start_port", "must be a port number 1..65535"),
        ]:
            section, name = key.split(".")
            self.assertRefused(
                f"{section}:\n  {name}: 0\n", f"2: {key}: {expected}, got 0"
            )

    def test_newKeys(self) -> None:
        """
        The keys the Go ngrokd lacks are read.
        """
        config = parse(
            """\
            api:
              ca_bundle: /etc/ngrokd/api-ca.pem
            ingress:
              ca_bundle: /etc/ngrokd/ingress-ca.pem
              insecure_skip_verify: true
              connect_timeout: 2.5
              upgrade_timeout: 3
              max_pending_dials: 8
              dial_queue_timeout: 4
            server:
              state_dir: /var/lib/ngrokd
            net:
              hosts_file: /tmp/hosts
            """
        ).config
        self.assertEqual(
            (config.api.ca_bundle, config.ingress, config.server.state_dir),
            (
                "/etc/ngrokd/api-ca.pem",
                IngressConfig(
                    "kubernetes-binding-ingress.ngrok.io:443",
                    "/etc/ngrokd/ingress-ca.pem",
                    True,
                    2.5,
                    3.0,
                    8,
                    4.0,
                ),
                "/var/lib/ngrokd",
            ),
        )
        self.assertEqual(config.net.hosts_file, "/tmp/hosts")

    def test_insecureWarns(self) -> None:
        """
        Turning ingress verification off is allowed, with a warning.
        """
        loaded = parse("ingress:\n  insecure_skip_verify: true\n")
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: ingress.insecure_skip_verify: the binding ingress's "
                "certificate will NOT be verified",
            ),
        )

    def test_shortPollIntervalWarns(self) -> None:
        """
        Polling more often than every five seconds is allowed, with a warning,
        as in the original.
        """
        loaded = parse("bound_endpoints:\n  poll_interval: 0.5\n")
        self.assertEqual(loaded.config.bound_endpoints.poll_interval, 0.5)
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: bound_endpoints.poll_interval: polling every 0.5s "
                "may hit ngrok API rate limits",
            ),
        )

    def test_logLevels(self) -> None:
        """
        Log levels are read case-insensitively; C{warning} means C{warn}, the
        name Twisted's logger uses.
        """
        for given_level, expected in [
            ("debug", "debug"),
            ("INFO", "info"),
            ("warn", "warn"),
            ("Warning", "warn"),
            ("error", "error"),
            ("critical", "critical"),
        ]:
            config = parse(f"server:\n  log_level: {given_level}\n").config
            self.assertEqual(config.server.log_level, expected)

    def test_listenModes(self) -> None:
        """
        C{listen_interface} and override values may be C{virtual}, C{0.0.0.0}
        or any IPv4 or IPv6 address.
        """
        for mode in ["virtual", "0.0.0.0", "192.168.1.5", "::", "fe80::1"]:
            config = parse(
                f"net:\n  listen_interface: '{mode}'\n  overrides: {{a.ns: '{mode}'}}\n"
            ).config
            self.assertEqual(
                (config.net.listen_interface, dict(config.net.overrides)),
                (mode, {"a.ns": mode}),
            )

    def test_apiURL(self) -> None:
        """
        The API URL may be http or https with a port and a path; a trailing
        slash is dropped so that paths can be appended.
        """
        for url, expected in [
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
            ("https://api.example/base/", "https://api.example/base"),
            ("https://api.ngrok.com", "https://api.ngrok.com"),
        ]:
            self.assertEqual(parse(f"api:\n  url: {url}\n").config.api.url, expected)


class ValidationTests(ConfigTestCase):
    """
    Bad values are refused with the file, the line and the dotted key.
    """

    def test_notYAML(self) -> None:
        """
        Text that is not YAML is refused with the line of the problem.
        """
        error = self.assertRaises(
            ConfigError, parse, "api:\n  url: https://x\nnet:\n  subnet: [\n"
        )
        self.assertTrue(
            str(error).startswith(f"{PATH}:5: not valid YAML: expected the node"),
            str(error),
        )
        error = self.assertRaises(ConfigError, parse, "net:\n\tsubnet: x\n")
        self.assertTrue(str(error).startswith(f"{PATH}:2: not valid YAML: "))

    def test_forbiddenCharacter(self) -> None:
        """
        A control character is refused with its line.
        """
        self.assertRefused(
            "api:\n  key: a\x07b\n",
            "2: not valid YAML: character #x0007: special characters are not allowed",
        )

    def test_twoDocuments(self) -> None:
        """
        A file holding two YAML documents is refused at the second.
        """
        self.assertRefused(
            "api: {}\n---\nnet: {}\n",
            "2: not valid YAML: but found another document "
            "(expected a single document in the stream)",
        )

    def test_topLevelNotMapping(self) -> None:
        """
        The file must be a mapping of sections.
        """
        self.assertRefused(
            "# comment\n- api\n- net\n",
            "2: the file must be a mapping of settings, got a list",
        )
        self.assertRefused(
            "just words\n",
            "1: the file must be a mapping of settings, got 'just words'",
        )

    def test_sectionNotMapping(self) -> None:
        """
        Each section must be a mapping.
        """
        self.assertRefused("api: {}\nnet: 5\n", "2: net: must be a mapping, got 5")
        self.assertRefused(
            "server:\n  - a\n", "2: server: must be a mapping, got a list"
        )

    def test_duplicateKey(self) -> None:
        """
        A key given twice is refused, naming both lines (the original's YAML
        library refused it too).
        """
        self.assertRefused(
            "net:\n  start_port: 1\n  subnet: 10.0.0.0/8\n  start_port: 2\n",
            "4: net.start_port: duplicate key (first on line 2)",
        )
        self.assertRefused(
            "api: {}\nnet: {}\napi: {}\n", "3: api: duplicate key (first on line 1)"
        )

    def test_mergeKeyRefused(self) -> None:
        """
        YAML merge keys are refused rather than half understood.
        """
        self.assertRefused(
            "net:\n  <<: {start_port: 1}\n",
            "2: net: keys must be plain names (no lists or << merges)",
        )

    def test_pollIntervalNotNumber(self) -> None:
        """
        A poll interval that is not a number is refused.
        """
        self.assertRefused(
            'bound_endpoints:\n  poll_interval: "abc"\n',
            "2: bound_endpoints.poll_interval: must be a positive number of "
            "seconds, got 'abc'",
        )
        self.assertRefused(
            "bound_endpoints:\n  poll_interval: true\n",
            "2: bound_endpoints.poll_interval: must be a positive number of "
            "seconds, got true",
        )

    def test_pollIntervalNotPositive(self) -> None:
        """
        A negative, infinite or NaN poll interval is refused (the original
        panicked on a negative one), as is one of more than 1e9 seconds.
        """
        for value in ["-5", "-0.1", ".nan", "-.inf"]:
            self.assertRefused(
                "# comment\nbound_endpoints:\n  selectors: []\n"
                f"  poll_interval: {value}\n",
                "4: bound_endpoints.poll_interval: must be a positive number of "
                f"seconds, got {value}",
            )
        self.assertRefused(
            "bound_endpoints:\n  poll_interval: 10000000000\n",
            "2: bound_endpoints.poll_interval: must be at most 1e+09 seconds, "
            "got 10000000000",
        )
        self.assertRefused(
            "bound_endpoints:\n  poll_interval: .inf\n",
            "2: bound_endpoints.poll_interval: must be at most 1e+09 seconds, got inf",
        )

    def test_maxPendingDialsNotCount(self) -> None:
        """
        The dial cap must be a whole number from 1 to a million.
        """
        for value in ["-1", "2.5", "true", "1000001"]:
            self.assertRefused(
                f"ingress:\n  max_pending_dials: {value}\n",
                "2: ingress.max_pending_dials: must be a whole number 1..1000000,"
                f" got {value}",
            )

    def test_poolSize(self) -> None:
        """
        The warm pool's size is a whole number from 0 (no pool) to 1,000.
        """
        loaded = parse("ingress:\n  pool_size: 0\n")
        self.assertEqual(loaded.config.ingress.pool_size, 0)
        for value in ["-1", "2.5", "true", "1001"]:
            self.assertRefused(
                f"ingress:\n  pool_size: {value}\n",
                f"2: ingress.pool_size: must be a whole number 0..1000, got {value}",
            )

    def test_negativeTimeouts(self) -> None:
        """
        Negative timeouts are refused.
        """
        for key in ["connect_timeout", "upgrade_timeout"]:
            self.assertRefused(
                f"ingress:\n  {key}: -1\n",
                f"2: ingress.{key}: must be a positive number of seconds, got -1",
            )

    def test_selectorsNotList(self) -> None:
        """
        Selectors must be a list of non-empty strings; the message hints at
        quoting an unquoted C{true}.
        """
        self.assertRefused(
            "bound_endpoints:\n  selectors: 'true'\n",
            "2: bound_endpoints.selectors: must be a list of strings, got 'true'",
        )
        self.assertRefused(
            "bound_endpoints:\n  selectors:\n    - 'a'\n    - true\n",
            "4: bound_endpoints.selectors[1]: must be a string, got true "
            "(quote it to make it a string)",
        )
        self.assertRefused(
            "bound_endpoints:\n  selectors: ['']\n",
            "2: bound_endpoints.selectors[0]: must not be empty",
        )
        self.assertRefused(
            "bound_endpoints:\n  selectors: [~]\n",
            "2: bound_endpoints.selectors[0]: must be a string, got null",
        )

    def test_overridesNotMapping(self) -> None:
        """
        Overrides must map bare hostnames to listen modes.
        """
        self.assertRefused(
            "net:\n  overrides: [a]\n",
            "2: net.overrides: must be a mapping, got a list",
        )
        self.assertRefused(
            "net:\n  overrides:\n    a.ns: virtual\n    8080: virtual\n",
            "4: net.overrides: keys must be bare hostnames, got 8080",
        )
        self.assertRefused(
            "net:\n  overrides:\n    http://a.ns: virtual\n",
            "3: net.overrides: keys must be bare hostnames, got 'http://a.ns'",
        )
        self.assertRefused(
            "net:\n  overrides:\n    a.ns: 5\n",
            "3: net.overrides.a.ns: must be a string, got 5 "
            "(quote it to make it a string)",
        )
        self.assertRefused(
            "net:\n  overrides:\n    a.ns:\n",
            "3: net.overrides.a.ns: must be a string, got null",
        )

    def test_unknownListenMode(self) -> None:
        """
        A listen mode that is not C{virtual} or an IP address is refused, in
        C{listen_interface} and in overrides.
        """
        self.assertRefused(
            "net:\n  listen_interface: eth0\n",
            "2: net.listen_interface: must be virtual, 0.0.0.0, :: or an IP address,"
            " got 'eth0'",
        )
        self.assertRefused(
            "net:\n  overrides:\n    db.ns: 192.168.1.500\n",
            "3: net.overrides.db.ns: must be virtual, 0.0.0.0, :: or an IP address,"
            " got '192.168.1.500'",
        )

    def test_ipv6ListenModes(self) -> None:
        """
        C{::} and IPv6 addresses are listen modes, in C{listen_interface}
        and in overrides.
        """
        net = parse(
            'net:\n  listen_interface: "::"\n  start_port: 9100\n'
            '  overrides:\n    db.ns: "fd00::5"\n'
        ).config.net
        self.assertEqual(net.listen_interface, "::")
        self.assertEqual(dict(net.overrides), {"db.ns": "fd00::5"})

    def test_subnet6(self) -> None:
        """
        C{net.subnet6} is C{auto} by default and when written so, C{""}
        turns IPv6 off, and an IPv6 block is read as its network (host bits
        set: with a warning).
        """
        self.assertEqual(parse("").config.net.subnet6, "auto")
        self.assertEqual(parse("net:\n  subnet6: auto\n").config.net.subnet6, "auto")
        self.assertEqual(parse('net:\n  subnet6: ""\n').config.net.subnet6, "")
        loaded = parse("net:\n  subnet6: FD00:1::7/64\n")
        self.assertEqual(
            loaded.config.net.subnet6, ipaddress.IPv6Network("fd00:1::/64")
        )
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: net.subnet6: FD00:1::7/64 has host bits set;"
                " using fd00:1::/64",
            ),
        )

    def test_subnet6Refused(self) -> None:
        """
        A value that is not an IPv6 block, a block longer than /120, and a
        block beside an IPv6 C{net.subnet} are refused, naming the line.
        """
        for value, shown in [("10.0.0.0/8", "'10.0.0.0/8'"), ('"fd00::"', "'fd00::'")]:
            self.assertRefused(
                f"net:\n  subnet6: {value}\n",
                f'2: net.subnet6: must be auto, "" (no IPv6) or an IPv6 block like'
                f" fd6e:6772:6f6b::/64, got {shown}",
            )
        self.assertRefused(
            "net:\n  subnet6: fd00::/121\n",
            "2: net.subnet6: fd00::/121 is too small: use a prefix of /120 or"
            " shorter (/64 is usual)",
        )
        self.assertEqual(
            parse("net:\n  subnet6: fd00::/120\n").config.net.subnet6,
            ipaddress.IPv6Network("fd00::/120"),
        )
        self.assertRefused(
            "net:\n  subnet: fd00::/64\n  subnet6: fd01::/64\n",
            "3: net.subnet6: net.subnet fd00::/64 gives IPv6 addresses already;"
            ' set net.subnet6 to "" or net.subnet to an IPv4 block',
        )
        self.assertEqual(parse("net:\n  subnet: fd00::/64\n").config.net.subnet6, "")

    def test_booleanNotBool(self) -> None:
        """
        A boolean must be a YAML boolean, not a string or a number.
        """
        for value, shown in [('"true"', "'true'"), ("1", "1"), ("'no'", "'no'")]:
            self.assertRefused(
                f"ingress:\n  insecure_skip_verify: {value}\n",
                f"2: ingress.insecure_skip_verify: must be true or false, got {shown}",
            )

    def test_badSubnet(self) -> None:
        """
        A subnet must be a CIDR block.
        """
        for value in ["10.107.0.0", "banana", "10.107.0.0/33", "''"]:
            shown = repr(yaml.safe_load(value))
            self.assertRefused(
                f"net:\n  subnet: {value}\n",
                f"2: net.subnet: must be a CIDR block like 10.107.0.0/16, got {shown}",
            )

    def test_subnetTooSmall(self) -> None:
        """
        A subnet without room for the gateway (.1) and one endpoint (.2) is
        refused; the smallest that has room is accepted.
        """
        for value in ["10.0.0.0/31", "10.0.0.7/32", "fd00::/127"]:
            self.assertRefused(
                f"net:\n  subnet: {value}\n",
                f"2: net.subnet: {value} is too small: it needs a gateway (.1) "
                "and at least one endpoint address (.2); use a prefix of /30 or "
                "shorter",
            )
        for value in ["10.0.0.0/30", "fd00::/126"]:
            subnet = parse(f"net:\n  subnet: {value}\n").config.net.subnet
            self.assertEqual(subnet, ipaddress.ip_network(value))

    def test_subnetHostBits(self) -> None:
        """
        A subnet with host bits set is read as its network, with a warning.
        """
        loaded = parse("net:\n  subnet: 10.107.3.4/16\n")
        self.assertEqual(
            loaded.config.net.subnet, ipaddress.IPv4Network("10.107.0.0/16")
        )
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: net.subnet: 10.107.3.4/16 has host bits set; "
                "using 10.107.0.0/16",
            ),
        )

    def test_subnetIPv6NotWarned(self) -> None:
        """
        An IPv6 subnet written in capitals is not mistaken for one with host
        bits set.
        """
        loaded = parse("net:\n  subnet: FD00:AB::/64\n")
        self.assertEqual(
            loaded.config.net.subnet, ipaddress.IPv6Network("fd00:ab::/64")
        )
        self.assertEqual(loaded.warnings, ())

    def test_startPortRange(self) -> None:
        """
        The first network-mode port must be a port number.
        """
        for value, shown in [
            ("0", "0"),
            ("65536", "65536"),
            ("-1", "-1"),
            ('"9080"', "'9080'"),
            ("9080.5", "9080.5"),
            ("true", "true"),
        ]:
            self.assertRefused(
                f"net:\n  start_port: {value}\n",
                f"2: net.start_port: must be a port number 1..65535, got {shown}",
            )
        for port in [1, 65535]:
            self.assertEqual(
                parse(f"net:\n  start_port: {port}\n").config.net.start_port, port
            )

    def test_discoveryLimits(self) -> None:
        """
        The most endpoints in one poll is a whole number, and the time a
        whole poll may take a number of seconds.
        """
        config = parse(
            "bound_endpoints:\n  max_endpoints: 50000\n  poll_timeout: 600\n"
        ).config
        self.assertEqual(
            (config.bound_endpoints.max_endpoints, config.bound_endpoints.poll_timeout),
            (50000, 600.0),
        )
        defaults = parse("").config.bound_endpoints
        self.assertEqual(
            (defaults.max_endpoints, defaults.poll_timeout), (10000, 120.0)
        )
        for value, shown in [("0", "0"), ("1.5", "1.5"), ("2000000", "2000000")]:
            self.assertRefused(
                f"bound_endpoints:\n  max_endpoints: {value}\n",
                "2: bound_endpoints.max_endpoints: must be a whole number"
                f" 1..1000000, got {shown}",
            )
        self.assertRefused(
            "bound_endpoints:\n  poll_timeout: 0\n",
            "2: bound_endpoints.poll_timeout: must be a positive number of"
            " seconds, got 0",
        )

    def test_reuseAfter(self) -> None:
        """
        The hold of released ports and addresses is a number of seconds,
        zero allowed.
        """
        self.assertEqual(parse("").config.net.reuse_after, 3600.0)
        self.assertEqual(parse("net:\n  reuse_after: 0\n").config.net.reuse_after, 0.0)
        for value in ["-1", "'soon'", "true"]:
            error = self.assertRaises(
                ConfigError, parse, f"net:\n  reuse_after: {value}\n"
            )
            self.assertIn(
                "2: net.reuse_after: must be a number of seconds, 0 or more", str(error)
            )

    def test_unreadableValue(self) -> None:
        """
        A value whose explicit YAML tag does not fit it is refused.
        """
        error = self.assertRaises(ConfigError, parse, "net:\n  start_port: !!int abc\n")
        self.assertTrue(
            str(error).startswith(f"{PATH}:2: net.start_port: cannot read the value: "),
            str(error),
        )

    def test_badLogLevel(self) -> None:
        """
        An unknown log level is refused, listing the known ones.
        """
        for value, shown in [("loud", "'loud'"), ("3", "3")]:
            self.assertRefused(
                f"server:\n  log_level: {value}\n",
                "2: server.log_level: must be one of critical, debug, error, info, "
                f"warn, warning; got {shown}",
            )

    def test_logFormat(self) -> None:
        """
        C{server.log_format} is C{text} (the default) or C{json}; anything
        else is refused.
        """
        self.assertEqual(parse("").config.server.log_format, "text")
        config = parse("server:\n  log_format: json\n").config
        self.assertEqual(config.server.log_format, "json")
        for value, shown in [("JSON", "'JSON'"), ("1", "1")]:
            self.assertRefused(
                f"server:\n  log_format: {value}\n",
                f"2: server.log_format: must be text or json; got {shown}",
            )

    def test_badApiURL(self) -> None:
        """
        The API URL must be http(s)://host.
        """
        for value in [
            "ftp://api.ngrok.com",
            "api.ngrok.com",
            "https://",
            "https://api.ngrok.com?x=1",
            "https://api.ngrok.com#top",
        ]:
            self.assertRefused(
                f"api:\n  url: '{value}'\n",
                f"2: api.url: must be an http(s)://host URL, got {value!r}",
            )
        error = self.assertRaises(
            ConfigError, parse, "api:\n  url: https://api.ngrok.com:99999\n"
        )
        self.assertTrue(
            str(error).startswith(
                f"{PATH}:2: api.url: must be an http(s)://host URL, "
                "got 'https://api.ngrok.com:99999': "
            ),
            str(error),
        )

    def test_wrongStringTypes(self) -> None:
        """
        A string setting given a number or a list is refused; a number is
        hinted to be quoted.
        """
        self.assertRefused(
            "net:\n  hosts_file: 12345\n",
            "2: net.hosts_file: must be a string, got 12345 (quote it to make it"
            " a string)",
        )
        self.assertRefused(
            "server:\n  socket_path: [a]\n",
            "2: server.socket_path: must be a string, got a list",
        )

    def test_keyNeverShown(self) -> None:
        """
        The API key is not in the configuration's repr, nor in the error
        about a key of the wrong type (an unquoted all-digits key, a key
        with a wrong tag, a list).
        """
        config = parse("api:\n  key: '8675309secret'\n").config
        self.assertEqual(config.api.key, "8675309secret")
        self.assertNotIn("8675309secret", repr(config))
        self.assertNotIn("8675309secret", repr(config.api))
        for value in ["86753090", "8675309.5", "!!int 86753", "[86753]", "{a: 86753}"]:
            error = self.assertRaises(ConfigError, parse, f"api:\n  key: {value}\n")
            self.assertNotIn("86753", str(error))
            self.assertIn(f"{PATH}:2: api.key: must be a string, got", str(error))
        self.assertRefused(
            "api:\n  key: 86753090\n",
            "2: api.key: must be a string, got a value of another type (quote it"
            " to make it a string); the value is not shown",
        )

    def test_emptyPaths(self) -> None:
        """
        A path that is present but empty is refused, not replaced by the
        default.
        """
        for key in ["socket_path", "state_dir", "client_cert", "client_key"]:
            self.assertRefused(
                f"server:\n  {key}: ''\n", f"2: server.{key}: must not be empty"
            )
        self.assertRefused(
            "net:\n  hosts_file: ''\n", "2: net.hosts_file: must not be empty"
        )

    def test_badInterfaceName(self) -> None:
        """
        An interface name Linux cannot hold is refused.
        """
        for value in ["a" * 16, "a/b", "a b"]:
            self.assertRefused(
                f"net:\n  interface_name: '{value}'\n",
                "2: net.interface_name: must be an interface name of at most 15 "
                f"characters without '/' or spaces, got {value!r}",
            )


class UnknownKeyTests(SynchronousTestCase):
    """
    Unknown keys are not fatal, but each is reported with its line.
    """

    def test_oldKey(self) -> None:
        """
        The retired C{network_accessible} is reported, with what replaced it.
        """
        loaded = parse("net:\n  network_accessible: true\nnetwork_accessible: true\n")
        hint = (
            "unknown key, ignored (no longer read; network access is chosen by "
            "net.listen_interface and net.overrides)"
        )
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: net.network_accessible: {hint}",
                f"{PATH}:3: network_accessible: {hint}",
            ),
        )
        self.assertEqual(loaded.config, default_config(PATH, {}, "linux").config)

    def test_typo(self) -> None:
        """
        A misspelt key is reported with the closest known key, and the
        setting it was meant to be keeps its default.
        """
        loaded = parse(
            """\
            # poll slowly
            bound_endpoints:
              selectors: ['true']
              poll_intervall: 60
            ingress_endpoint: a.example:443
            """
        )
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:4: bound_endpoints.poll_intervall: unknown key, ignored "
                "(did you mean bound_endpoints.poll_interval?)",
                f"{PATH}:5: ingress_endpoint: unknown key, ignored "
                "(did you mean ingressEndpoint?)",
            ),
        )
        self.assertEqual(loaded.config.bound_endpoints.poll_interval, 30.0)

    def test_wrongSection(self) -> None:
        """
        A key put in the wrong section, or at the top level, is reported with
        where it belongs.
        """
        loaded = parse("poll_interval: 60\napi:\n  subnet: 10.0.0.0/8\n")
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:1: poll_interval: unknown key, ignored "
                "(did you mean bound_endpoints.poll_interval?)",
                f"{PATH}:3: api.subnet: unknown key, ignored "
                "(did you mean net.subnet?)",
            ),
        )

    def test_dottedKeyAtTopLevel(self) -> None:
        """
        A dotted key written at the top level is not taken for the nested one.
        """
        loaded = parse("api.url: https://elsewhere.example\n")
        self.assertEqual(loaded.config.api.url, "https://api.ngrok.com")
        self.assertEqual(
            loaded.warnings,
            (f"{PATH}:1: api.url: unknown key, ignored (did you mean api?)",),
        )

    def test_unknownWithoutSuggestion(self) -> None:
        """
        An unknown key like nothing known is reported without a suggestion,
        and its value is not read.
        """
        loaded = parse("zzz: !!int not-a-number\n")
        self.assertEqual(loaded.warnings, (f"{PATH}:1: zzz: unknown key, ignored",))


class EnvironmentTests(SynchronousTestCase):
    """
    The environment supplies the API key and the hosts file path.
    """

    def test_apiKeyFromEnvironment(self) -> None:
        """
        C{NGROK_API_KEY} is the API key when the file has none or an empty
        one; a key in the file wins.
        """
        environ = {"NGROK_API_KEY": "from-env"}
        self.assertEqual(parse("", environ).config.api.key, "from-env")
        self.assertEqual(parse("api:\n  key: ''\n", environ).config.api.key, "from-env")
        self.assertEqual(
            parse("api:\n  key: in-file\n", environ).config.api.key, "in-file"
        )
        self.assertEqual(
            default_config(PATH, environ, "linux").config.api.key, "from-env"
        )

    def test_hostsPathFromEnvironment(self) -> None:
        """
        C{NGROKD_HOSTS_PATH} replaces C{net.hosts_file}, given or not; empty,
        it is ignored.
        """
        environ = {"NGROKD_HOSTS_PATH": "/tmp/test-hosts"}
        text = "net:\n  hosts_file: /etc/other-hosts\n"
        self.assertEqual(parse("", environ).config.net.hosts_file, "/tmp/test-hosts")
        self.assertEqual(parse(text, environ).config.net.hosts_file, "/tmp/test-hosts")
        self.assertEqual(
            parse(text, {"NGROKD_HOSTS_PATH": ""}).config.net.hosts_file,
            "/etc/other-hosts",
        )


class PlatformTests(SynchronousTestCase):
    """
    macOS gets a loopback subnet by default, and a warning when configured
    with another.
    """

    def test_darwinDefault(self) -> None:
        """
        On macOS the default subnet is 127.0.0.0/8.
        """
        loaded = default_config(PATH, {}, "darwin")
        self.assertEqual(loaded.config.net.subnet, ipaddress.IPv4Network("127.0.0.0/8"))
        self.assertEqual(loaded.warnings, ())

    def test_darwinIPv4Only(self) -> None:
        """
        On macOS virtual mode is IPv4 only: C{net.subnet6} is off by
        default, and a block given is ignored with a warning.
        """
        self.assertEqual(default_config(PATH, {}, "darwin").config.net.subnet6, "")
        loaded = parse("net:\n  subnet6: fd00::/64\n", platform="darwin")
        self.assertEqual(loaded.config.net.subnet6, "")
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: net.subnet6: macOS virtual mode is IPv4 only (aliases"
                " of lo0 in 127.0.0.0/8); ignored",
            ),
        )

    def test_darwinExplicitSubnetHonoured(self) -> None:
        """
        On macOS a configured subnet outside 127.0.0.0/8 is kept (the original
        silently replaced it), with a warning.
        """
        loaded = parse_config(ORIGINAL_EXAMPLE, PATH, {}, "darwin")
        self.assertEqual(
            loaded.config.net.subnet, ipaddress.IPv4Network("10.107.0.0/16")
        )
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:19: net.subnet: macOS virtual mode needs addresses in "
                "127.0.0.0/8; 10.107.0.0/16 is outside it",
            ),
        )
        loaded = parse("net:\n  subnet: fd00::/64\n", platform="darwin")
        self.assertEqual(
            loaded.warnings,
            (
                f"{PATH}:2: net.subnet: macOS virtual mode needs addresses in "
                "127.0.0.0/8; fd00::/64 is outside it",
            ),
        )

    def test_darwinLoopbackSubnet(self) -> None:
        """
        On macOS a subnet inside 127.0.0.0/8 is used without a warning.
        """
        loaded = parse("net:\n  subnet: 127.42.0.0/16\n", platform="darwin")
        self.assertEqual(
            loaded.config.net.subnet, ipaddress.IPv4Network("127.42.0.0/16")
        )
        self.assertEqual(loaded.warnings, ())

    def test_linuxAnySubnet(self) -> None:
        """
        Elsewhere the default is 10.107.0.0/16 and loopback is not required.
        """
        self.assertEqual(
            default_config(PATH, {}, "linux").config.net.subnet,
            ipaddress.IPv4Network("10.107.0.0/16"),
        )
        self.assertEqual(parse("net:\n  subnet: 10.0.0.0/8\n").warnings, ())


class StateDirTests(SynchronousTestCase):
    """
    Where certificates and state live, including the original's rule that
    the certificate's directory is the state directory.
    """

    def server(self, text: str, path: str = PATH) -> ServerConfig:
        return parse_config(dedent(text), path, {}, "linux").config.server

    def test_fromClientCert(self) -> None:
        """
        Without C{state_dir}, the directory of C{client_cert} is the state
        directory, and the key defaults to C{tls.key} beside it.
        """
        server = self.server("server:\n  client_cert: /srv/ngrokd/cert.pem\n")
        self.assertEqual(
            (server.state_dir, server.client_cert, server.client_key),
            ("/srv/ngrokd", "/srv/ngrokd/cert.pem", "/srv/ngrokd/tls.key"),
        )

    def test_keyDoesNotMoveStateDir(self) -> None:
        """
        C{client_key} alone does not change the state directory.
        """
        server = self.server("server:\n  client_key: /srv/k.pem\n")
        self.assertEqual(
            (server.state_dir, server.client_cert, server.client_key),
            ("/etc/ngrokd", "/etc/ngrokd/tls.crt", "/srv/k.pem"),
        )

    def test_explicitStateDir(self) -> None:
        """
        C{state_dir} holds the certificate and key unless they are given, and
        wins over the certificate's directory.
        """
        server = self.server("server:\n  state_dir: /var/lib/ngrokd\n")
        self.assertEqual(
            (server.client_cert, server.client_key),
            ("/var/lib/ngrokd/tls.crt", "/var/lib/ngrokd/tls.key"),
        )
        server = self.server(
            "server:\n  state_dir: /var/lib/ngrokd\n  client_cert: /srv/c.pem\n"
        )
        self.assertEqual(
            (server.state_dir, server.client_cert, server.client_key),
            ("/var/lib/ngrokd", "/srv/c.pem", "/var/lib/ngrokd/tls.key"),
        )

    def test_relativePaths(self) -> None:
        """
        Relative paths are relative to the config file's directory.
        """
        config = parse_config(
            dedent(
                """\
                api:
                  ca_bundle: api.pem
                server:
                  client_cert: certs/tls.crt
                  socket_path: ngrokd.sock
                net:
                  hosts_file: ../hosts
                """
            ),
            "/opt/ngrokd/config.yml",
            {},
            "linux",
        ).config
        self.assertEqual(
            (
                config.api.ca_bundle,
                config.server.state_dir,
                config.server.client_key,
                config.server.socket_path,
                config.net.hosts_file,
            ),
            (
                "/opt/ngrokd/api.pem",
                "/opt/ngrokd/certs",
                "/opt/ngrokd/certs/tls.key",
                "/opt/ngrokd/ngrokd.sock",
                "/opt/ngrokd/../hosts",
            ),
        )


class IngressEndpointTests(ConfigTestCase):
    """
    C{ingressEndpoint} is normalised to C{host:port}.
    """

    def test_normalised(self) -> None:
        """
        C{:443} is added when no port is given; IPv6 literals stay bracketed
        in C{endpoint} and lose the brackets in C{host}.
        """
        for value, endpoint, host, port in [
            ("ingress.example", "ingress.example:443", "ingress.example", 443),
            ("ingress.example:8443", "ingress.example:8443", "ingress.example", 8443),
            ("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1", 1),
            ("h:065535", "h:65535", "h", 65535),
            ("[::1]", "[::1]:443", "::1", 443),
            ("[::1]:8443", "[::1]:8443", "::1", 8443),
        ]:
            ingress = parse(f"ingressEndpoint: '{value}'\n").config.ingress
            self.assertEqual(
                (ingress.endpoint, ingress.host, ingress.port), (endpoint, host, port)
            )

    def test_tooManyColons(self) -> None:
        """
        More than one colon outside brackets is refused, with a hint about
        schemes and IPv6 brackets.
        """
        for value in ["h:1:2", "::1", "https://h:443"]:
            self.assertRefused(
                f"api: {{}}\ningressEndpoint: '{value}'\n",
                "2: ingressEndpoint: must be host:port (no scheme; an IPv6 address "
                f"in brackets), got {value!r}",
            )

    def test_badPort(self) -> None:
        """
        The port must be a number from 1 to 65535.
        """
        for value, port in [
            ("h:0", "0"),
            ("h:65536", "65536"),
            ("h:x", "x"),
            ("h:", ""),
            ("[::1]:", ""),
            ("h:-1", "-1"),
        ]:
            self.assertRefused(
                f"ingressEndpoint: '{value}'\n",
                f"1: ingressEndpoint: port must be 1..65535, got {port!r}",
            )

    def test_badHost(self) -> None:
        """
        An empty or malformed host is refused.
        """
        for value in [":443", "a/b:443", "a b"]:
            self.assertRefused(
                f"ingressEndpoint: '{value}'\n",
                f"1: ingressEndpoint: must be host:port, got {value!r}",
            )
        for value in ["[::1", "[::1]x"]:
            self.assertRefused(
                f"ingressEndpoint: '{value}'\n",
                f"1: ingressEndpoint: must be host:port or [ipv6]:port, got {value!r}",
            )
        self.assertRefused(
            "ingressEndpoint: '[ingress.example]:443'\n",
            "1: ingressEndpoint: 'ingress.example' in brackets is not an IPv6 address",
        )
        self.assertRefused(
            "ingressEndpoint: ''\n", "1: ingressEndpoint: must not be empty"
        )


class HealthAddressTests(ConfigTestCase):
    """
    C{server.health_address} is an IP address and a port, or empty for off.
    """

    def test_default(self) -> None:
        """
        Without the key the health server listens where the original's did.
        """
        self.assertEqual(parse("").config.server.health_address, "127.0.0.1:8081")

    def test_accepted(self) -> None:
        """
        IPv4 and bracketed IPv6 addresses are normalised; empty turns the
        server off.
        """
        for value, expected in [
            ("0.0.0.0:8081", "0.0.0.0:8081"),
            ("127.0.0.1:09090", "127.0.0.1:9090"),
            ("[::1]:8081", "[::1]:8081"),
            ("[::]:1", "[::]:1"),
            ("[0:0::1]:8081", "[::1]:8081"),
            ("", ""),
        ]:
            server = parse(f"server:\n  health_address: '{value}'\n").config.server
            self.assertEqual(server.health_address, expected)

    def test_refused(self) -> None:
        """
        A name, a missing or bad port, and a bare IPv6 address are refused,
        each saying what to write.
        """
        for value in ["localhost:8081", "8081", ":8081", "[::1:8081"]:
            self.assertRefused(
                f"server:\n  health_address: '{value}'\n",
                "2: server.health_address: must be an IP address and a port like"
                " 127.0.0.1:8081, 0.0.0.0:8081 or [::1]:8081 (empty: off),"
                f" got {value!r}",
            )
        for value, port in [("127.0.0.1:0", "0"), ("[::1]:x", "x"), ("1.2.3.4:", "")]:
            self.assertRefused(
                f"server:\n  health_address: '{value}'\n",
                f"2: server.health_address: port must be 1..65535, got {port!r}",
            )
        self.assertRefused(
            "server:\n  health_address: '::1:8081'\n",
            "2: server.health_address: put an IPv6 address in brackets: [::1]:8081",
        )


class WebHostsTests(ConfigTestCase):
    """
    C{server.web_hosts} lists the extra names the web page answers to.
    """

    def test_default(self) -> None:
        """
        Without the key, no name beyond C{localhost} is allowed.
        """
        self.assertEqual(parse("").config.server.web_hosts, ())

    def test_accepted(self) -> None:
        """
        Names are kept lowercased, without a trailing dot.
        """
        server = parse(
            "server:\n  web_hosts: [Ngrokd.Example., box.lan]\n"
        ).config.server
        self.assertEqual(server.web_hosts, ("ngrokd.example", "box.lan"))

    def test_refused(self) -> None:
        """
        A name with a port or scheme, an empty name, or a string instead of
        a list is refused, naming the item.
        """
        self.assertRefused(
            "server:\n  web_hosts: [ok.lan, 'box.lan:8081']\n",
            "2: server.web_hosts[1]: must be a bare host name, got 'box.lan:8081'",
        )
        self.assertRefused(
            "server:\n  web_hosts: ['']\n",
            "2: server.web_hosts[0]: must not be empty",
        )
        self.assertRefused(
            "server:\n  web_hosts: box.lan\n",
            "2: server.web_hosts: must be a list of host names, got 'box.lan'",
        )


class AllowedDomainsTests(ConfigTestCase):
    """
    C{net.allowed_domains} lists the domains virtual-mode names must be in.
    """

    def test_default(self) -> None:
        """
        Without the key, or with an empty list, any domain is allowed.
        """
        self.assertEqual(parse("").config.net.allowed_domains, ())
        self.assertEqual(
            parse("net:\n  allowed_domains: []\n").config.net.allowed_domains, ()
        )

    def test_accepted(self) -> None:
        """
        Domains are kept lowercased, without a leading or final dot, each
        once, in the order given.
        """
        net = parse(
            "net:\n  allowed_domains: [Prod, .example.internal., prod, xn--p1ai]\n"
        ).config.net
        self.assertEqual(net.allowed_domains, ("prod", "example.internal", "xn--p1ai"))

    def test_refused(self) -> None:
        """
        A wildcard, a URL or address with a port, a name with a space, an
        empty domain, or a string instead of a list is refused, naming the
        item.
        """
        self.assertRefused(
            "net:\n  allowed_domains: [prod, '*.example.internal']\n",
            "2: net.allowed_domains[1]: write the domain alone: 'example.internal'"
            " takes in every name under it",
        )
        for bad in ("https://prod", "prod:80", "a b.prod", ".", "a..b", "-a.prod"):
            self.assertRefused(
                f"net:\n  allowed_domains: [{bad!r}]\n",
                "2: net.allowed_domains[0]: must be a DNS domain like"
                " example.internal (labels of letters, digits and hyphens), got"
                f" {bad!r}",
            )
        self.assertRefused(
            "net:\n  allowed_domains: ['']\n",
            "2: net.allowed_domains[0]: must not be empty",
        )
        self.assertRefused(
            "net:\n  allowed_domains: prod\n",
            "2: net.allowed_domains: must be a list of domains, got 'prod'",
        )


class DnsTests(ConfigTestCase):
    """
    The C{dns} section: how names reach the system, where the server
    listens, where it forwards.
    """

    def test_defaults(self) -> None:
        """
        By default: auto, the server where the mode puts it, the system's
        own upstream servers.
        """
        self.assertEqual(parse("").config.dns, DnsConfig("auto", "", ()))

    def test_values(self) -> None:
        """
        Addresses take port 53 unless they give one; IPv6 goes in brackets
        with a port; a bare off (false to YAML) is off.
        """
        dns = parse(
            "dns:\n  mode: off\n  listen: 10.107.0.1\n"
            "  upstreams: [192.0.2.53, '[2001:db8::53]:5353', '2001:db8::54']\n"
        ).config.dns
        self.assertEqual(
            dns,
            DnsConfig(
                "off",
                "10.107.0.1:53",
                ("192.0.2.53:53", "[2001:db8::53]:5353", "[2001:db8::54]:53"),
            ),
        )
        self.assertEqual(
            parse("dns:\n  listen: '127.0.0.1:5353'\n").config.dns.listen,
            "127.0.0.1:5353",
        )

    def test_refused(self) -> None:
        """
        An unknown mode, a name instead of an address, a bad port, and an
        endpoint's address of net.subnet are refused, naming the key.
        """
        self.assertRefused(
            "dns:\n  mode: dnsmasq\n",
            "2: dns.mode: must be one of auto, resolved, resolver-files, hosts,"
            " off; got 'dnsmasq'",
        )
        self.assertRefused(
            "dns:\n  listen: ns.example:53\n",
            "2: dns.listen: must be an IP address (a name would need DNS itself),"
            " like 10.107.0.1:53; got 'ns.example:53'",
        )
        self.assertRefused(
            "dns:\n  upstreams: ['192.0.2.1:0']\n",
            "2: dns.upstreams[0]: port must be 1..65535, got '0', like 192.0.2.53"
            " or [2001:db8::53]:53",
        )
        self.assertRefused(
            "dns:\n  listen: 10.107.0.9\n",
            "2: dns.listen: 10.107.0.9 is in net.subnet 10.107.0.0/16, whose"
            " addresses go to endpoints: use 10.107.0.1 (kept for the DNS server)"
            " or an address outside it",
        )


class LoadConfigTests(SynchronousTestCase):
    """
    L{load_config} reads the file, and names it when it cannot.
    """

    def test_loads(self) -> None:
        """
        The file is read and parsed; the path is made absolute.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("net:\n  start_port: 10000\n")
        loaded = load_config(path, {}, "linux")
        self.assertEqual(loaded.config.path, os.path.abspath(path))
        self.assertEqual(loaded.config.net.start_port, 10000)

    def test_errorNamesAbsolutePath(self) -> None:
        """
        Errors in the file name it by its absolute path.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("net:\n  start_port: 0\n")
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertEqual(
            str(error),
            f"{os.path.abspath(path)}:2: net.start_port: must be a port number "
            "1..65535, got 0",
        )

    def test_missing(self) -> None:
        """
        A missing file is an error naming the path and the OS error.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertEqual(
            str(error),
            f"{path}: cannot read the config file: No such file or directory",
        )

    def test_keyInFileOthersCanRead(self) -> None:
        """
        An API key in a file that group or others can read is a warning
        naming the file, line and mode; without a key, or with mode 0600,
        there is none.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("net:\n  start_port: 10000\napi:\n  key: 'k'\n")
        os.chmod(path, 0o644)
        self.assertEqual(
            load_config(path, {}, "linux").warnings,
            (
                f"{path}:4: api.key: the file is readable by group or others"
                f" (mode 0644): chmod 600 {path}, or give the key in NGROK_API_KEY",
            ),
        )
        os.chmod(path, 0o600)
        self.assertEqual(load_config(path, {}, "linux").warnings, ())
        with open(path, "w") as f:
            f.write("api:\n  key: ''\n")
        os.chmod(path, 0o644)
        self.assertEqual(load_config(path, {}, "linux").warnings, ())

    def test_directory(self) -> None:
        """
        A directory is not a config file.
        """
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertEqual(
            str(error),
            f"{path}: cannot read the config file: not a regular file but a directory",
        )

    def test_fifo(self) -> None:
        """
        A FIFO at the config's path, or at a CA bundle's, is refused at
        once, naming it: reading it would wait for a writer forever.
        """
        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        fifo = os.path.join(base, "fifo")
        os.mkfifo(fifo)
        error = self.assertRaises(ConfigError, load_config, fifo, {}, "linux")
        self.assertEqual(
            str(error),
            f"{fifo}: cannot read the config file: not a regular file but a FIFO",
        )
        path = os.path.join(base, "config.yml")
        with open(path, "w") as f:
            f.write(f"ingress:\n  ca_bundle: {fifo}\n")
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertEqual(
            str(error),
            f"{path}:2: ingress.ca_bundle: cannot read {fifo}: not a regular file"
            " but a FIFO",
        )

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 text is refused, naming it.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"api:\n  key: \xff\n")
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertTrue(str(error).startswith(f"{path}: not UTF-8 text: "), str(error))


class ValueTests(SynchronousTestCase):
    """
    The configuration values cannot be changed after loading.
    """

    def test_overridesReadOnly(self) -> None:
        """
        Overrides are a read-only mapping, even when built from a dict.
        """
        source = {"a.ns": "0.0.0.0"}
        net = attrs.evolve(
            default_config(PATH, {}, "linux").config.net, overrides=source
        )
        source["b.ns"] = "virtual"
        self.assertEqual(dict(net.overrides), {"a.ns": "0.0.0.0"})
        overrides: Any = net.overrides
        self.assertRaises(TypeError, operator.setitem, overrides, "c.ns", "virtual")

    def test_hashable(self) -> None:
        """
        A configuration is hashable, so it can key a cache.
        """
        config = parse_config(ORIGINAL_EXAMPLE, PATH, {}, "linux").config
        self.assertEqual(
            hash(config), hash(parse_config(ORIGINAL_EXAMPLE, PATH, {}, "linux").config)
        )


class SchemaTests(SynchronousTestCase):
    """
    Each key is declared once, in its section's field
    (L{ngrokd.config.schema}): the loader reads every one of them with its
    own check, and the configuration reference describes every one.
    """

    def test_everyKeyRead(self) -> None:
        """
        Every key the schema declares is read from the file by its check: a
        value no check takes is refused, naming the file, line and key.
        """
        for key in SETTINGS:
            section, _, name = key.rpartition(".")
            text, line = f"{name}: {{[1]: 1}}\n", 1
            if section:
                text, line = f"{section}:\n  {text}", 2
            error = self.assertRaises(ConfigError, parse, text)
            self.assertTrue(str(error).startswith(f"{PATH}:{line}: {key}: "), error)

    def test_everyKeyDocumented(self) -> None:
        """
        The configuration reference has one entry for each key, and none
        for a key the schema does not declare.
        """
        with open(source_file("docs", "configuration.rst")) as f:
            entries = re.findall(
                r"(?m)^``([\w.]+)``(?: \*\*NEW\*\*)?\n    \S", f.read()
            )
        self.assertEqual(sorted(entries), sorted(SETTINGS))


def _node(value: str) -> yaml.Node:
    """
    The node of the string C{value}, as the loader composes it.
    """
    node = yaml.compose(yaml.safe_dump(value))
    assert node is not None
    return node


class NormalisedTests(SynchronousTestCase):
    """
    The address checks (L{ngrokd.config.addresses}) write each value one
    way, and what they write reads back as itself.
    """

    def test_normalised(self) -> None:
        """
        An address, block or C{host:port} is read in its one written form:
        ports without leading zeros, IPv6 compressed in brackets, a block
        without host bits, the default port added; read again, it is
        unchanged.
        """
        ctx = Context(PATH, "linux")
        for check, written, expected in [
            (addresses.ingress_endpoint, "ingress.example", "ingress.example:443"),
            (addresses.ingress_endpoint, "[::1]", "[::1]:443"),
            (addresses.ingress_endpoint, "host:0443", "host:443"),
            (addresses.listen_address, "[0:0::1]:8081", "[::1]:8081"),
            (addresses.listen_address, " 127.0.0.1:08081 ", "127.0.0.1:8081"),
            (addresses.dns_listen, "10.107.0.1", "10.107.0.1:53"),
            (addresses.dns_listen, "[FD00::1]:53", "[fd00::1]:53"),
            (addresses.subnet, "10.1.2.3/16", ipaddress.ip_network("10.1.0.0/16")),
            (addresses.subnet6, "FD00:1::7/64", ipaddress.ip_network("fd00:1::/64")),
        ]:
            once = check(_node(written), "key", ctx)
            again = check(_node(str(once)), "key", ctx)
            self.assertEqual((once, again), (expected, expected), written)


def _same(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, Any]]:
    return strategy.map(lambda value: (value, value))


_text = st.text(st.characters(codec="utf-8"))
_names = st.from_regex(
    r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True
)
_paths = st.lists(
    st.text(
        st.characters(codec="utf-8", exclude_characters="/\0"),
        min_size=1,
    ),
    min_size=1,
    max_size=3,
).map(lambda parts: "/" + "/".join(parts))
_seconds = st.one_of(
    st.integers(1, 10**9).map(lambda n: (n, float(n))),
    _same(st.floats(min_value=0, max_value=1e9, exclude_min=True)),
)
_modes = st.one_of(st.just("virtual"), st.just("0.0.0.0"), st.ip_addresses().map(str))


@st.composite
def _ingress_endpoints(draw: st.DrawFn) -> tuple[str, str]:
    host = draw(st.one_of(_names, st.ip_addresses(v=6).map(lambda a: f"[{a}]")))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    if port is None:
        return host, f"{host}:443"
    return f"{host}:{port}", f"{host}:{port}"


@st.composite
def _subnets(draw: st.DrawFn) -> tuple[str, Any]:
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, 30 if address.version == 4 else 126))
    subnet = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(subnet), subnet


#: For each key, values as written in the file and as read back.
_VALUES: dict[str, st.SearchStrategy[tuple[Any, Any]]] = {
    "api.url": st.tuples(
        st.sampled_from(["http", "https"]),
        _names,
        st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
        st.sampled_from(["", "/v2"]),
    ).map(lambda t: ("{}://{}{}{}".format(*t),) * 2),
    "api.key": _same(_text),
    "api.ca_bundle": _same(_paths),
    "ingressEndpoint": _ingress_endpoints(),
    "ingress.ca_bundle": _same(_paths),
    "ingress.insecure_skip_verify": _same(st.booleans()),
    "ingress.connect_timeout": _seconds,
    "ingress.upgrade_timeout": _seconds,
    "ingress.max_pending_dials": _same(st.integers(1, 1_000_000)),
    "ingress.dial_queue_timeout": _seconds,
    "ingress.pool_size": _same(st.integers(0, 1000)),
    "ingress.pool_idle_timeout": _seconds,
    "ingress.pool_max_age": _seconds,
    "ingress.pool_linger": _seconds,
    "ingress.early_data": _same(st.booleans()),
    "server.log_level": st.sampled_from(
        [("debug", "debug"), ("INFO", "info"), ("warning", "warn"), ("error", "error")]
    ),
    "server.log_format": _same(st.sampled_from(["text", "json"])),
    "server.socket_path": _same(_paths),
    "server.state_dir": _same(_paths),
    "server.client_cert": _same(_paths),
    "server.client_key": _same(_paths),
    "server.health_address": st.sampled_from(
        [("", ""), ("0.0.0.0:8081", "0.0.0.0:8081"), ("[::1]:80", "[::1]:80")]
    ),
    "server.shutdown_grace": _seconds,
    "server.idle_timeout": _seconds,
    "bound_endpoints.poll_interval": _seconds,
    "bound_endpoints.selectors": st.lists(_text.filter(bool)).map(
        lambda s: (s, tuple(s))
    ),
    "net.interface_name": _same(
        st.from_regex(r"[a-z][a-z0-9_.-]{0,14}", fullmatch=True)
    ),
    "net.subnet": _subnets(),
    "net.listen_interface": _same(_modes),
    "net.start_port": _same(st.integers(1, 65535)),
    "net.overrides": _same(st.dictionaries(_names, _modes)),
    "net.hosts_file": _same(_paths),
    "net.allowed_domains": st.lists(
        st.from_regex(
            r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,8}){0,3}", fullmatch=True
        ),
        unique=True,
    ).map(lambda names: (names, tuple(names))),
    "dns.mode": _same(st.sampled_from(DNS_MODES)),
    "dns.upstreams": st.lists(st.ip_addresses(v=4).map(str), unique=True).map(
        lambda servers: (servers, tuple(f"{s}:53" for s in servers))
    ),
}


@st.composite
def _documents(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A config document with any subset of the keys, and the values each key
    present should load as.
    """
    document: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    for key, strategy in _VALUES.items():
        if draw(st.booleans()):
            written, expected[key] = draw(strategy)
            section, _, name = key.rpartition(".")
            (document.setdefault(section, {}) if section else document)[name] = written
    return document, expected


def _attribute(config: Config, key: str) -> Any:
    section, _, name = key.rpartition(".")
    if key == "ingressEndpoint":
        section, name = "ingress", "endpoint"
    return getattr(getattr(config, section), name)


class RoundTripTests(SynchronousTestCase):
    """
    Any valid configuration written as YAML reads back as written.
    """

    @given(_documents())
    def test_roundTrip(self, case: tuple[dict[str, Any], dict[str, Any]]) -> None:
        """
        Every key present loads as written; every absent key has its
        default, the certificate paths following the state directory.
        """
        document, expected = case
        config = parse_config(yaml.safe_dump(document), PATH, {}, "linux").config
        defaults = default_config(PATH, {}, "linux").config
        if "server.state_dir" not in expected and "server.client_cert" in expected:
            expected["server.state_dir"] = os.path.dirname(
                expected["server.client_cert"]
            )
        state_dir = expected.get("server.state_dir", "/etc/ngrokd")
        expected.setdefault("server.client_cert", os.path.join(state_dir, "tls.crt"))
        expected.setdefault("server.client_key", os.path.join(state_dir, "tls.key"))
        for key in _VALUES:
            want = expected[key] if key in expected else _attribute(defaults, key)
            self.assertEqual(_attribute(config, key), want, key)

    @given(
        st.dictionaries(
            st.sampled_from([*_VALUES, "net", "api", "zzz"]),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | _text,
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(_text, inner, max_size=3)
                ),
                max_leaves=6,
            ),
        )
    )
    def test_anyDocumentLoadsOrIsRefused(self, document: dict[str, Any]) -> None:
        """
        Whatever values the keys hold, the file either loads or is refused
        with a L{ConfigError} naming it: never another exception.
        """
        nested: dict[str, Any] = {}
        for key, value in sorted(document.items()):
            section, _, name = key.rpartition(".")
            if not section:
                nested[key] = value
            elif isinstance(nested.get(section), dict):
                nested[section][name] = value
            else:
                nested[section] = {name: value}
        try:
            parse_config(yaml.safe_dump(nested), PATH, {}, "darwin")
        except ConfigError as e:
            self.assertTrue(str(e).startswith(f"{PATH}:"), str(e))


class BoundedConfigTests(ConfigTestCase):
    """
    A config file's size and nesting are bounded, with an error naming the
    file, the line and the key, not a traceback or minutes of parsing.
    """

    def test_deepFlowNesting(self) -> None:
        """
        20,000 nested flow lists are refused at the first level too deep.
        """
        self.assertRefused(
            "net:\n  overrides:\n    x: " + "[" * 20000,
            "3: net.overrides.x"
            + "[0]" * (MAX_DEPTH - 3)
            + f": nested more than {MAX_DEPTH} levels deep",
        )

    def test_deepBlockNesting(self) -> None:
        """
        Mappings nested by indentation are refused the same way.
        """
        text = "".join(" " * depth + f"k{depth}:\n" for depth in range(300))
        keys = ".".join(f"k{depth}" for depth in range(MAX_DEPTH - 1))
        self.assertRefused(
            text,
            f"{MAX_DEPTH}: {keys}: nested more than {MAX_DEPTH} levels deep",
        )

    def test_deepEnoughAccepted(self) -> None:
        """
        Nesting up to the limit is read as usual (here, an unknown key).
        """
        text = "x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
        self.assertEqual(len(parse(text).warnings), 1)

    def test_tooLarge(self) -> None:
        """
        A file larger than L{MAX_CONFIG_SIZE}, such as 400,000 unknown keys,
        is refused before it is parsed; from disk, no more than that is read.
        """
        text = "".join(f"k{n}: 1\n" for n in range(400_000))
        self.assertRefused(
            text,
            f" larger than {MAX_CONFIG_SIZE} characters; a config file holds a"
            " few settings",
        )
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        error = self.assertRaises(ConfigError, load_config, path, {}, "linux")
        self.assertIn(f"{path}: larger than {MAX_CONFIG_SIZE}", str(error))

    def test_unknownKeysCounted(self) -> None:
        """
        Past twenty, unknown keys are counted in one warning, not listed.
        """
        warnings = parse("".join(f"k{n}: 1\n" for n in range(1000))).warnings
        self.assertEqual(len(warnings), 21)
        self.assertEqual(warnings[-1], f"{PATH}:1: 980 more unknown keys, ignored")
