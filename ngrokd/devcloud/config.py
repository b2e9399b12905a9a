# -*- test-case-name: ngrokd.test.test_devcloud_tap -*-
"""
An ngrokd configuration that points at a running devcloud.

So that trying ngrokd needs neither an ngrok account nor root: the API and
the ingress are the devcloud's (each verified against the CA bundle it
wrote), endpoints listen in network mode on a loopback address from a port
above 1024, and the control socket and hosts file live in ngrokd's state
directory instead of C{/var/run} and C{/etc}. The file is commented, so that
a user can read it and edit it into a real configuration.
"""

from __future__ import annotations

import json
import os

from attrs import evolve, frozen

from ngrokd.atomic import write_atomic

#: Seconds between ngrokd's polls of the devcloud's bound endpoints: quick
#: enough for trying things, slow enough that ngrokd does not warn.
POLL_INTERVAL = 5.0

_TEMPLATE = """\
# ngrokd configuration for the devcloud at {api_url}
# (written by `twistd ngrokd-devcloud`, and again at each of its starts).
# Run ngrokd with it, as an ordinary user:
#   twistd -n ngrokd --config {path}

api:
  # The devcloud's API, verified against the CA it wrote (not system trust).
  url: {api_url_q}
  key: {api_key}
  ca_bundle: {api_ca}

# The devcloud's binding ingress. Its certificate chains to an intermediate
# CA, as ngrok's does; ingress.ca_bundle holds that intermediate.
ingressEndpoint: {ingress}
ingress:
  ca_bundle: {ingress_ca}
  insecure_skip_verify: false
  connect_timeout: 10
  upgrade_timeout: 10

server:
  log_level: info
  # Key, certificate, operator id and allocations are kept here; the control
  # socket is here too, so no root is needed.
  state_dir: {state_dir}
  socket_path: {socket_path}

bound_endpoints:
  poll_interval: {poll_interval}
  selectors: ['true']

net:
  # Network mode: every endpoint listens on this address, on ports counted
  # up from start_port, so no virtual interface (and no root) is needed.
  listen_interface: {listen_interface}
  start_port: {start_port}
  # ngrokd writes its marked section of endpoint names to this file, not to
  # /etc/hosts.
  hosts_file: {hosts_file}
"""


def _quoted(value: str) -> str:
    """
    A YAML double-quoted scalar (JSON's string syntax is valid YAML).
    """
    return json.dumps(value)


@frozen
class DaemonSettings:
    """
    What an ngrokd configuration needs to use a devcloud: where its API and
    ingress are, the key and CA bundles to use them, and where ngrokd keeps
    its state and listens.
    """

    api_url: str
    api_key: str
    ingress_endpoint: str
    api_ca_path: str
    ingress_ca_path: str
    state_dir: str
    start_port: int = 9080
    listen_interface: str = "127.0.0.1"
    poll_interval: float = POLL_INTERVAL


def render_daemon_config(path: str, settings: DaemonSettings) -> str:
    """
    The text of the configuration L{write_daemon_config} writes to C{path}.
    """
    return _TEMPLATE.format(
        path=path,
        api_url=settings.api_url,
        api_url_q=_quoted(settings.api_url),
        api_key=_quoted(settings.api_key),
        api_ca=_quoted(settings.api_ca_path),
        ingress=_quoted(settings.ingress_endpoint),
        ingress_ca=_quoted(settings.ingress_ca_path),
        state_dir=_quoted(settings.state_dir),
        socket_path=_quoted(os.path.join(settings.state_dir, "ngrokd.sock")),
        poll_interval=f"{settings.poll_interval:g}",
        listen_interface=_quoted(settings.listen_interface),
        start_port=settings.start_port,
        hosts_file=_quoted(os.path.join(settings.state_dir, "hosts")),
    )


def write_daemon_config(path: str, settings: DaemonSettings) -> None:
    """
    Write an ngrokd configuration for the devcloud to C{path} (mode 0600: it
    holds the API key). All paths in it are made absolute; the state
    directory is created (0700) with an empty C{hosts} file in it when
    missing.

    @raise ngrokd.atomic.AtomicWriteError: naming the file that could not be
        written.
    """
    settings = evolve(
        settings,
        api_ca_path=os.path.abspath(settings.api_ca_path),
        ingress_ca_path=os.path.abspath(settings.ingress_ca_path),
        state_dir=os.path.abspath(settings.state_dir),
    )
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    hosts = os.path.join(settings.state_dir, "hosts")
    if not os.path.exists(hosts):
        write_atomic(hosts, b"", 0o644)
    text = render_daemon_config(os.path.abspath(path), settings)
    write_atomic(path, text.encode("utf-8"), 0o600)
