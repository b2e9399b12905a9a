# -*- test-case-name: ngrokd.test.test_ingress,ngrokd.test.test_twisted_seams -*-
"""
Which servers ngrokd trusts, and the TLS client settings built from that.

ngrok's binding ingress chains to ngrok's private I{intermediate} CA. Go accepts
an intermediate as a trust anchor; OpenSSL does so only with the partial-chain
flag, which the ingress's trust sets, and only it: the API is verified as a
browser verifies a site, up to a root.
"""

from __future__ import annotations

import os
from typing import Any

from attrs import frozen
from OpenSSL.crypto import X509, X509StoreFlags
from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER, Connection, Context
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ngrokd.pem import MAX_BUNDLE, PEMError, parse_certificates
from ngrokd.readfile import read_regular

#: Where the Go ngrokd (and ngrok's operator image) looks for ngrok's CA.
NGROK_CA_DIR = "/etc/ssl/certs/ngrok"

_log = Logger()

#: What verifies a server, for those who hold one: Twisted's interface for it
#: is private (see L{PartialChainTrust}), and so imported here alone.
TrustRoot = IOpenSSLTrustRoot


@implementer(IOpenSSLTrustRoot)
@frozen
class PartialChainTrust:
    """
    Trust C{certificates} (and the platform's store when C{system}), any of
    them as an anchor, intermediates included.
    """

    certificates: tuple[X509, ...] = ()
    system: bool = True

    def _addCACertsToContext(self, context: Context) -> None:
        """
        Twisted's hook for a trust root: C{optionsForClientTLS} (and so
        C{BrowserLikePolicyForHTTPS}) calls it on every client context.

        Both the hook and the interface that declares it,
        C{twisted.internet._sslverify.IOpenSSLTrustRoot}, are private, yet
        they are Twisted's only way to choose how a server is verified, and
        the partial-chain flag needs that.
        """
        self.add_to_context(context)

    def add_to_context(self, context: Context) -> None:
        """
        Make C{context} trust these certificates, intermediates included.
        """
        if self.system:
            context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for certificate in self.certificates:
            store.add_cert(certificate)
        store.set_flags(X509StoreFlags.PARTIAL_CHAIN)


def load_ingress_trust(
    ca_bundle: str | None, ca_dir: str = NGROK_CA_DIR
) -> PartialChainTrust:
    """
    What verifies the binding ingress: the configured CA bundle alone when
    there is one; otherwise the platform's store plus every PEM file in
    C{ca_dir}, as the Go ngrokd reads it. Any of them anchors a chain.
    """
    if ca_bundle:
        return PartialChainTrust(_bundle(ca_bundle), system=False)
    extra: list[X509] = []
    if os.path.isdir(ca_dir):
        for name in sorted(os.listdir(ca_dir)):
            path = os.path.join(ca_dir, name)
            try:
                extra.extend(_bundle(path))
            except PEMError as e:
                _log.warn("skipping CA file {path}: {error}", path=path, error=str(e))
    return PartialChainTrust(tuple(extra), system=True)


def load_api_trust(ca_bundle: str | None) -> IOpenSSLTrustRoot:
    """
    What verifies ngrok's API: the configured CA bundle, else the platform's
    store, each as a browser trusts it: the chain must reach a root there.
    Never partial chains, which would let any intermediate in the store (or
    ngrok's ingress CA) vouch for C{api.ngrok.com}.
    """
    trust: IOpenSSLTrustRoot = (
        ssl.trustRootFromCertificates([ssl.Certificate(x) for x in _bundle(ca_bundle)])
        if ca_bundle
        else ssl.platformTrust()
    )
    return trust


def _bundle(path: str) -> tuple[X509, ...]:
    try:
        pem, _ = read_regular(path, MAX_BUNDLE + 1)
    except OSError as e:
        raise PEMError(f"{path}: {e.strerror or e}") from None
    if len(pem) > MAX_BUNDLE:
        raise PEMError(f"{path}: larger than {MAX_BUNDLE // 2**20} MiB")
    return parse_certificates(pem, path)


@implementer(IPolicyForHTTPS)
class LateTrustPolicy:
    """
    The API client's HTTPS policy, whose trust is given once the daemon
    starts: reading a CA bundle is I/O, which constructors do not do.
    """

    def __init__(self) -> None:
        self._policy: BrowserLikePolicyForHTTPS | None = None

    def use(self, trust: IOpenSSLTrustRoot) -> None:
        """
        Verify servers against C{trust} from now on.
        """
        self._policy = BrowserLikePolicyForHTTPS(trust)

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        if self._policy is None:
            raise PEMError("no CA trust loaded yet: the daemon has not started")
        creator: IOpenSSLClientConnectionCreator = self._policy.creatorForNetloc(
            hostname, port
        )
        return creator


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """
    Sends SNI and the client certificate but checks nothing about the server.
    """

    def __init__(self, hostname: str, options: ssl.CertificateOptions) -> None:
        self._hostname = hostname.encode("idna")
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> Connection:
        connection = Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _NameCheckingCreator:
    """
    What Twisted's C{optionsForClientTLS} makes (SNI for a name, the chain
    checked against the trust, the leaf's name checked), with the name
    check set once on the shared context. Twisted's makes a new callback
    and identity to check for each connection, and asks the factory for
    ALPN protocols: per connection work, also for a resumed handshake,
    which checks no certificate.
    """

    def __init__(self, hostname: str, options: ssl.CertificateOptions) -> None:
        self._host = hostname
        self._identity: DNS_ID | IPAddress_ID
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self._server_name = None  # no SNI for an address (RFC 6066)
            self._identity = IPAddress_ID(hostname)
        else:
            self._server_name = hostname.encode("idna")
            self._identity = DNS_ID(self._server_name.decode("ascii"))
        self._context = options.getContext()
        self._context.set_verify(
            VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, self._check_name
        )

    def clientConnectionForTLS(self, tlsProtocol: object) -> Connection:
        connection = Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        connection.set_connect_state()
        return connection

    def _check_name(
        self, connection: Connection, certificate: X509, error: int, depth: int, ok: int
    ) -> bool:
        """
        OpenSSL checked C{certificate}'s place in the chain (C{ok}); the
        leaf must also be for the host, or the handshake fails with
        L{VerificationError}, as with Twisted's check.
        """
        if depth != 0:
            return bool(ok)
        try:
            verify_service_identity(extract_patterns(certificate), [self._identity], [])
        except VerificationError:
            connection.get_app_data().failVerification(Failure())
            return False
        except Exception:
            # Raised into OpenSSL, it would be lost.
            _log.failure(
                "while checking the name in {host}'s certificate", host=self._host
            )
            return False
        return bool(ok)


def client_creator(
    hostname: str,
    trust: IOpenSSLTrustRoot,
    client_certificate: ssl.PrivateCertificate | None = None,
    insecure_skip_verify: bool = False,
) -> IOpenSSLClientConnectionCreator:
    """
    TLS 1.2+ client settings for C{hostname} (SNI, and the name the server's
    certificate must carry), built once and shared by every connection.
    Session tickets are accepted, so that a connection can resume one.
    """
    settings: dict[str, Any] = {
        "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
        "enableSessionTickets": True,
    }
    if client_certificate is not None:
        settings["privateKey"] = client_certificate.privateKey.original
        settings["certificate"] = client_certificate.original
    if insecure_skip_verify:
        _log.critical(
            "insecure_skip_verify is on: the certificate of {host} is NOT checked;"
            " anyone on the path can read and change the traffic",
            host=hostname,
        )
        return _UnverifiedClientCreator(hostname, ssl.CertificateOptions(**settings))
    options = ssl.CertificateOptions(trustRoot=trust, **settings)
    return _NameCheckingCreator(hostname, options)
