# -*- test-case-name: ngrokd.test.test_ingress -*-
"""
Certificates from PEM text, without I/O: for the daemon's trust in ngrok's
ingress and API, the config's check of the files it names, and the devcloud.
"""

from __future__ import annotations

import re

from cryptography import x509
from OpenSSL.crypto import X509

#: A CA bundle larger than this is some other file (the system's is < 1 MiB).
MAX_BUNDLE = 16 * 2**20
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class PEMError(ValueError):
    """
    A CA bundle cannot be read or holds no certificate.
    """


def parse_certificates(pem: bytes, source: str) -> tuple[X509, ...]:
    """
    Every PEM certificate in C{pem}; C{source} names it in errors.
    """
    found = _PEM_CERT.findall(pem)
    if not found:
        raise PEMError(f"{source}: no PEM certificate found")
    try:
        return tuple(
            X509.from_cryptography(x509.load_pem_x509_certificate(block))
            for block in found
        )
    except ValueError as e:
        raise PEMError(f"{source}: {e}") from None
