"""
The data-path benchmark's C baseline: a stunnel mutual-TLS pair.

Two stunnel processes do in C what ngrokd and the devcloud's ingress do in
Python. The client accepts plaintext on 127.0.0.1 and carries it over TLS 1.3
with a client certificate, checking the server's certificate against a CA
and the address 127.0.0.1; the server requires that client certificate,
verifies it against the same CA, then connects to a backend. One service of
each is configured per backend. Session resumption is left at stunnel's
defaults: the server issues tickets and the client offers its last session,
so most connections resume.

This module writes the pair's certificates and configuration files and reads
what its logs say; C{datapath.py} starts the processes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from attrs import frozen

from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.ngrok.identity import generate_key, make_csr

#: The server's log line for each handshake, at C{debug = info}.
_HANDSHAKE = re.compile(rb"TLS accepted: (previous session reused|new session)")
_VERSION = re.compile(r"\]: stunnel (\S+) on ")
_OPENSSL = re.compile(r"\]: Running\s+with (OpenSSL [^\n]+)")

LOOPBACK = "127.0.0.1"
CERTIFICATE_DAYS = 1


def find_stunnel() -> str | None:
    """
    The stunnel binary on C{PATH} (Debian's C{stunnel4} package installs
    both names), or C{None}.
    """
    for name in ("stunnel", "stunnel4"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


@frozen
class Service:
    """
    One service of the pair: plaintext in at C{client_port}, TLS between
    C{client_port}'s stunnel and C{server_port}, plaintext out to
    C{backend_port}, all on 127.0.0.1. With a C{relay_port}, the client
    connects there, to a relay that carries the TLS leg to C{server_port}.
    """

    name: str
    client_port: int
    server_port: int
    backend_port: int
    relay_port: int | None = None

    @property
    def client_connects_to(self) -> int:
        return self.server_port if self.relay_port is None else self.relay_port


@frozen
class PairFiles:
    """
    Each side's configuration file (which names its pid and TLS files).
    """

    client_config: Path
    server_config: Path


def _write_key(path: Path, key_pem: bytes) -> None:
    path.touch(mode=0o600)  # stunnel warns of a key others can read
    path.write_bytes(key_pem)


def _sections(routes: Iterable[tuple[str, int, int]]) -> str:
    return "".join(
        f"\n[{name}]\naccept = {LOOPBACK}:{accept}\nconnect = {LOOPBACK}:{connect}\n"
        for name, accept, connect in routes
    )


def _config(directory: Path, role: str, options: list[str], sections: str) -> Path:
    lines = [
        "foreground = yes",
        "syslog = no",
        f"pid = {directory / f'stunnel-{role}.pid'}",
        f"cert = {directory / f'{role}.pem'}",
        f"key = {directory / f'{role}.key'}",
        f"CAfile = {directory / 'ca.pem'}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
        *options,
    ]
    path = directory / f"stunnel-{role}.conf"
    path.write_text("\n".join(lines) + "\n" + sections)
    return path


def write_pair(directory: Path, services: Sequence[Service]) -> PairFiles:
    """
    Write, in C{directory}, a throwaway CA, a server certificate for
    127.0.0.1 and a client certificate issued as the devcloud issues
    ngrokd's (a P-384 key, a CSR), then each side's configuration.
    """
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority.create("ngrokd bench stunnel CA")
    (directory / "ca.pem").write_bytes(authority.cert_pem)
    server_cert, server_key = authority.issue_server([LOOPBACK], CERTIFICATE_DAYS)
    (directory / "server.pem").write_bytes(server_cert)
    _write_key(directory / "server.key", server_key)
    client_key = generate_key()
    issued = authority.sign_csr(make_csr(client_key), CERTIFICATE_DAYS)
    (directory / "client.pem").write_bytes(issued.cert_pem)
    _write_key(directory / "client.key", client_key)
    client = _config(
        directory,
        "client",
        ["client = yes", f"checkIP = {LOOPBACK}"],
        _sections((s.name, s.client_port, s.client_connects_to) for s in services),
    )
    # Info-level logging on the server only: it names each resumed handshake.
    server = _config(
        directory,
        "server",
        ["requireCert = yes", "debug = info"],
        _sections((s.name, s.server_port, s.backend_port) for s in services),
    )
    return PairFiles(client, server)


@frozen
class Handshakes:
    """
    TLS handshakes the server completed, and how many of them resumed.
    """

    total: int
    resumed: int


def count_handshakes(log: bytes) -> Handshakes:
    """
    The handshakes in (a part of) the server's log.
    """
    found = _HANDSHAKE.findall(log)
    return Handshakes(len(found), found.count(b"previous session reused"))


def describe_version(log: str) -> str | None:
    """
    C{stunnel 5.68 (OpenSSL 3.0.19 ...)}, from the start of a log.
    """
    version = _VERSION.search(log)
    if version is None:
        return None
    openssl = _OPENSSL.search(log)
    runs_with = f" ({openssl.group(1).strip()})" if openssl else ""
    return f"stunnel {version.group(1)}{runs_with}"
