# -*- test-case-name: ngrokd.test.test_identity -*-
"""
Who this ngrokd is to ngrok: a private key, the binding certificate ngrok
issued for it, and the id of the Kubernetes operator record they belong to.

The files are the Go ngrokd's (C{tls.key}: PEM "EC PRIVATE KEY", P-384,
0600; C{tls.crt}: the PEM ngrok returned, 0644; C{operator_id}: the id with
no newline, 0644), written atomically and in an order that lets any crash be
recovered without leaking an operator:

  - registering writes the key I{before} asking ngrok (the key is never lost
    once ngrok knows it), then the certificate, then the operator id;
  - renewing writes the new key beside the old one (C{tls.key.new}) and swaps
    it in only after ngrok issued its certificate, so a failed renewal leaves
    the old key and certificate in use.

L{IdentityStore.load} tells a complete identity from a partial one
(L{RepairNeeded}); L{repair} finishes the job with the least disruption: it
renews under a known operator id, or finds the operator whose certificate
carries our key, and registers anew only when neither is possible.

L{IdentityStore} reads and writes synchronously, and each write waits for
C{fsync}; L{register}, L{renew} and L{repair} call it through an
L{InThread}, off the reactor thread.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ngrokd.atomic import read_if_exists, replace_durably, write_atomic
from ngrokd.blocking import InThread
from ngrokd.ngrok.answers import Operator
from ngrokd.ngrok.apierrors import APIError

_log = Logger()

T = TypeVar("T")

KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIRECTORY_MODE = 0o755


class OperatorAPI(Protocol):
    """
    What identity management needs of L{ngrokd.ngrok.api.NgrokAPI}.
    """

    def register(
        self,
        description: str,
        metadata: str,
        selectors: Sequence[str],
        region: str,
        csr_pem: bytes,
    ) -> Deferred[Operator]: ...

    def renew(
        self, operator_id: str, csr_pem: bytes, selectors: Sequence[str]
    ) -> Deferred[Operator]: ...

    def operators(self) -> Deferred[list[Operator]]: ...


class IdentityError(Exception):
    """
    Base of the identity failures.
    """


class StateDirNotWritable(IdentityError):
    """
    A directory the identity lives in cannot be created or written to; found
    before ngrok is asked for anything, so no operator is left orphaned.
    """

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(directory, reason)
        self.directory = directory
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write the state directory {self.directory}: {self.reason}"


class IdentityUnreadable(IdentityError):
    """
    An identity file exists but cannot be read (permissions, I/O error); it
    needs a human, since repairing would replace it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read {self.path}: {self.reason}"


class CertificateMismatch(IdentityError):
    """
    ngrok returned a certificate that is not for the key its CSR was made
    with (ngrok returns the old certificate for a CSR it has seen before).
    """

    def __init__(self, operator_id: str) -> None:
        super().__init__(operator_id)
        self.operator_id = operator_id

    def __str__(self) -> str:
        return (
            f"the certificate ngrok returned for operator {self.operator_id} is"
            " not for the key just generated"
        )


@frozen
class Identity:
    """
    A complete identity. C{ingress_endpoint} is what ngrok reported when it
    issued the certificate, C{None} when loaded from disk.
    """

    operator_id: str
    cert_pem: bytes
    key_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime
    ingress_endpoint: str | None = None

    def expired(self, now: datetime.datetime) -> bool:
        return now >= self.not_after


@frozen
class RepairNeeded:
    """
    The state directory holds part of an identity: C{reason} says what is
    wrong. C{operator_id} is the stored id when there is one (renewing under
    it repairs everything else); C{public_key} (DER) is the stored key's or
    certificate's, to recognise our operator when the id is lost.
    """

    reason: str
    operator_id: str | None
    public_key: bytes | None


def generate_key() -> bytes:
    """
    A new ECDSA P-384 private key, PEM "EC PRIVATE KEY" (SEC1), as the Go
    ngrokd writes it.
    """
    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_csr(key_pem: bytes) -> bytes:
    """
    A PEM CSR for the key with an empty subject and no extensions, signed
    with SHA-384: what ngrok requires for a binding certificate.
    """
    key = serialization.load_pem_private_key(key_pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the binding key must be an EC key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_public_key(key_pem: bytes) -> bytes:
    """
    The DER public key of a PEM private key.

    @raise ValueError: not a readable private key.
    """
    return _spki(serialization.load_pem_private_key(key_pem, None).public_key())


def _leaf(cert_pem: bytes) -> x509.Certificate:
    """
    The first certificate of a PEM file (the leaf; a chain may follow).

    @raise ValueError: no readable certificate.
    """
    certificates = x509.load_pem_x509_certificates(cert_pem)
    return certificates[0]


def needs_renewal(
    identity: Identity, now: datetime.datetime, margin: datetime.timedelta
) -> bool:
    """
    Whether the certificate expires within C{margin} of C{now} (or has).
    """
    return now >= identity.not_after - margin


def _identity(
    operator_id: str, cert_pem: bytes, key_pem: bytes, ingress: str | None = None
) -> Identity:
    leaf = _leaf(cert_pem)
    return Identity(
        operator_id=operator_id,
        cert_pem=cert_pem,
        key_pem=key_pem,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        ingress_endpoint=ingress,
    )


class IdentityStore:
    """
    The identity files: C{tls.key}, C{tls.crt} and C{operator_id} in
    C{state_dir}, unless the configuration names other paths for the key and
    certificate (the same paths are then read and written). Its methods
    block (each write waits for C{fsync}): call them off the reactor thread.
    """

    def __init__(
        self, state_dir: str, cert_path: str | None = None, key_path: str | None = None
    ) -> None:
        self.state_dir = state_dir
        self.cert_path = cert_path or os.path.join(state_dir, "tls.crt")
        self.key_path = key_path or os.path.join(state_dir, "tls.key")
        self.operator_id_path = os.path.join(state_dir, "operator_id")
        self.pending_key_path = self.key_path + ".new"

    def _read(self, path: str) -> bytes | None:
        try:
            return read_if_exists(path)
        except OSError as e:
            raise IdentityUnreadable(path, e.strerror or str(e)) from None

    def load(self) -> Identity | RepairNeeded | None:
        """
        The stored identity; C{None} when there is none at all.

        A renewal interrupted after its certificate was saved is completed
        here (the new key is moved into place). An expired certificate still
        loads: L{needs_renewal} says so and L{renew} fixes it.

        @raise IdentityUnreadable: a file exists but cannot be read.
        """
        key_pem = self._read(self.key_path)
        cert_pem = self._read(self.cert_path)
        raw_id = self._read(self.operator_id_path)
        pending = self._read(self.pending_key_path)
        operator_id = _operator_id(raw_id)
        key_der = _try(key_public_key, key_pem)
        cert_der = _try(lambda pem: _spki(_leaf(pem).public_key()), cert_pem)
        if pending is not None and cert_der is not None and cert_der != key_der:
            if _try(key_public_key, pending) == cert_der:
                _log.info(
                    "completing an interrupted renewal: {pending} replaces {key}",
                    pending=self.pending_key_path,
                    key=self.key_path,
                )
                replace_durably(self.pending_key_path, self.key_path)
                key_pem, key_der = pending, cert_der
        if key_pem is None and cert_pem is None and raw_id is None:
            return None
        problems = []
        if key_pem is None:
            problems.append(f"{self.key_path} is missing")
        elif key_der is None:
            problems.append(f"{self.key_path} holds no readable private key")
        if cert_pem is None:
            problems.append(f"{self.cert_path} is missing")
        elif cert_der is None:
            problems.append(f"{self.cert_path} holds no readable certificate")
        if key_der is not None and cert_der is not None and key_der != cert_der:
            problems.append(
                f"{self.cert_path} is not the certificate of {self.key_path}"
            )
        if operator_id is None:
            state = "missing" if raw_id is None else "empty or unreadable"
            problems.append(f"{self.operator_id_path} is {state}")
        if problems or operator_id is None or key_pem is None or cert_pem is None:
            return RepairNeeded("; ".join(problems), operator_id, key_der or cert_der)
        return _identity(operator_id, cert_pem, key_pem)

    def check_writable(self) -> None:
        """
        Create the directories of the identity files if needed (0755) and
        prove that files can be created in them.

        @raise StateDirNotWritable: naming the directory and why.
        """
        directories = {
            self.state_dir,
            os.path.dirname(os.path.abspath(self.cert_path)),
            os.path.dirname(os.path.abspath(self.key_path)),
        }
        for directory in sorted(directories):
            try:
                os.makedirs(directory, DIRECTORY_MODE, exist_ok=True)
                fd, probe = tempfile.mkstemp(prefix=".ngrokd-probe.", dir=directory)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise StateDirNotWritable(directory, "not a directory") from None
                raise StateDirNotWritable(directory, e.strerror or str(e)) from None

    def save_key(self, key_pem: bytes) -> None:
        write_atomic(self.key_path, key_pem, KEY_MODE)

    def save_pending_key(self, key_pem: bytes) -> None:
        """
        Keep a new key beside the one in use until its certificate arrives.
        """
        write_atomic(self.pending_key_path, key_pem, KEY_MODE)

    def commit_pending_key(self) -> None:
        replace_durably(self.pending_key_path, self.key_path)

    def discard_pending_key(self) -> None:
        try:
            os.unlink(self.pending_key_path)
        except FileNotFoundError:
            pass

    def save_cert(self, cert_pem: bytes) -> None:
        write_atomic(self.cert_path, cert_pem, PUBLIC_MODE)

    def save_operator_id(self, operator_id: str) -> None:
        """
        Write the id as the Go ngrokd does (no newline).

        @raise ValueError: an empty id is never stored.
        """
        operator_id = operator_id.strip()
        if not operator_id:
            raise ValueError("refusing to store an empty operator id")
        write_atomic(self.operator_id_path, operator_id.encode("utf-8"), PUBLIC_MODE)


def _operator_id(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _try(parse: Callable[[bytes], T], data: bytes | None) -> T | None:
    if data is None:
        return None
    try:
        return parse(data)
    except ValueError:
        return None


def _checked(operator: Operator, key_pem: bytes) -> Operator:
    if _spki(_leaf(operator.cert_pem).public_key()) != key_public_key(key_pem):
        raise CertificateMismatch(operator.id)
    return operator


def register(
    api: OperatorAPI,
    store: IdentityStore,
    selectors: Sequence[str],
    hostname: str,
    in_thread: InThread,
) -> Deferred[Identity]:
    """
    Register a new operator for this machine and store its identity.

    The state directory is checked first, and the key is on disk before
    ngrok is asked, so a crash at any point leaves something L{repair} can
    finish without orphaning an operator.
    """
    return Deferred.fromCoroutine(_register(api, store, selectors, hostname, in_thread))


def renew(
    api: OperatorAPI,
    store: IdentityStore,
    identity: Identity,
    selectors: Sequence[str],
    in_thread: InThread,
) -> Deferred[Identity]:
    """
    Get a certificate for a new key (ngrok issues one only for a new CSR),
    updating the endpoint selectors. Until ngrok has answered, the old key
    and certificate stay in place and usable; if it fails, they remain.
    """
    return Deferred.fromCoroutine(_renew(api, store, identity, selectors, in_thread))


def repair(
    api: OperatorAPI,
    store: IdentityStore,
    state: RepairNeeded,
    selectors: Sequence[str],
    hostname: str,
    in_thread: InThread,
) -> Deferred[Identity]:
    """
    Make a partial identity whole again, keeping the operator ngrok knows:

      1. with an operator id, renew under it (new key and certificate); if
         ngrok no longer has that operator (404), register anew;
      2. without one, look for the operator whose certificate carries the
         stored key (or certificate) and renew under its id;
      3. otherwise register anew.
    """
    return Deferred.fromCoroutine(
        _repair(api, store, state, selectors, hostname, in_thread)
    )


async def _register(
    api: OperatorAPI,
    store: IdentityStore,
    selectors: Sequence[str],
    hostname: str,
    in_thread: InThread,
) -> Identity:
    await in_thread(store.check_writable)
    key_pem = generate_key()
    await in_thread(store.save_key, key_pem)
    metadata = json.dumps({"hostname": hostname, "type": "forward-proxy"})
    operator = _checked(
        await api.register(
            description=f"ngrokd on {hostname}",
            metadata=metadata,
            selectors=selectors,
            region="global",
            csr_pem=make_csr(key_pem),
        ),
        key_pem,
    )
    await in_thread(store.save_cert, operator.cert_pem)
    await in_thread(store.save_operator_id, operator.id)
    _log.info("registered with ngrok as operator {id}", id=operator.id)
    return _identity(operator.id, operator.cert_pem, key_pem, operator.ingress_endpoint)


async def _rotate(
    api: OperatorAPI,
    store: IdentityStore,
    operator_id: str,
    selectors: Sequence[str],
    in_thread: InThread,
) -> Identity:
    await in_thread(store.check_writable)
    key_pem = generate_key()
    await in_thread(store.save_pending_key, key_pem)
    try:
        operator = _checked(
            await api.renew(operator_id, make_csr(key_pem), selectors), key_pem
        )
    except Exception:
        await in_thread(store.discard_pending_key)
        raise
    await in_thread(store.save_cert, operator.cert_pem)
    await in_thread(store.commit_pending_key)
    return _identity(operator_id, operator.cert_pem, key_pem, operator.ingress_endpoint)


async def _renew(
    api: OperatorAPI,
    store: IdentityStore,
    identity: Identity,
    selectors: Sequence[str],
    in_thread: InThread,
) -> Identity:
    renewed = await _rotate(api, store, identity.operator_id, selectors, in_thread)
    _log.info(
        "renewed the certificate of operator {id}, valid until {not_after}",
        id=renewed.operator_id,
        not_after=renewed.not_after.isoformat(),
    )
    return renewed


async def _repair(
    api: OperatorAPI,
    store: IdentityStore,
    state: RepairNeeded,
    selectors: Sequence[str],
    hostname: str,
    in_thread: InThread,
) -> Identity:
    _log.warn("the stored identity needs repair: {reason}", reason=state.reason)
    await in_thread(store.check_writable)
    operator_id = state.operator_id
    if operator_id is None and state.public_key is not None:
        for operator in await api.operators():
            certificate = _try(_leaf, operator.cert_pem)
            if certificate and _spki(certificate.public_key()) == state.public_key:
                operator_id = operator.id
                _log.info("found our operator {id} by its key", id=operator_id)
                break
    if operator_id is not None:
        try:
            identity = await _rotate(api, store, operator_id, selectors, in_thread)
        except APIError as e:
            if e.status != 404:
                raise
            _log.warn("operator {id} no longer exists at ngrok", id=operator_id)
        else:
            await in_thread(store.save_operator_id, operator_id)
            return identity
    return await _register(api, store, selectors, hostname, in_thread)
