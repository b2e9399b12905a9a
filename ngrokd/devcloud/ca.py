# -*- test-case-name: ngrokd.test.test_devcloud_api,ngrokd.test.test_ingress -*-
"""
The devcloud's certificate authority.

It plays both of ngrok's roles: it signs the CSRs that operators register with
(client certificates for the binding ingress), and it issues the server
certificates of the API and the ingress. Like ngrok, it can issue through an
intermediate so that clients have to trust an intermediate as the anchor.
"""

from __future__ import annotations

import datetime
import ipaddress

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ngrokd devcloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


@frozen
class IssuedCertificate:
    """
    A certificate with its validity, as the API reports it.
    """

    cert_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime


@frozen
class CertificateAuthority:
    """
    A CA key and certificate; C{chain_pem} is what a leaf it issues should be
    served with (itself, for an intermediate; nothing for a root).
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    chain_pem: bytes = b""

    @classmethod
    def create(cls, common_name: str, days: int = 3650) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @classmethod
    def load(
        cls, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b""
    ) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the devcloud CA key must be an EC key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem), chain_pem)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def _builder(self, subject: x509.Name, days: float) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()
                ),
                critical=False,
            )
        )

    def intermediate(self, common_name: str, days: int = 3650) -> CertificateAuthority:
        """
        A CA below this one that may sign leaves only (path length 0), as
        ngrok's "Intermediate CA" is.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            self._builder(_name(common_name), days)
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return CertificateAuthority(
            key, certificate, certificate.public_bytes(serialization.Encoding.PEM)
        )

    def issue_server(
        self, hostnames: list[str], days: int = 825
    ) -> tuple[bytes, bytes]:
        """
        A server certificate and its key (PEM) for C{hostnames}; the
        certificate PEM includes this CA's chain.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            self._builder(_name(hostnames[0]), days)
            .public_key(key.public_key())
            .add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hostnames]),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        return (
            certificate.public_bytes(serialization.Encoding.PEM) + self.chain_pem,
            _key_pem(key),
        )

    def sign_csr(self, csr_pem: bytes, days: float) -> IssuedCertificate:
        """
        A client certificate for the key in C{csr_pem}, as ngrok issues binding
        certificates: the CSR's subject is ignored, its signature is checked.
        """
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature does not verify")
        certificate = (
            self._builder(_name("ngrokd devcloud binding"), days)
            .public_key(csr.public_key())
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert_pem=certificate.public_bytes(serialization.Encoding.PEM)
            + self.chain_pem,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
        )
