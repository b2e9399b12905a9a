"""
Tests for L{ngrokd.ngrok.identity}: the key, certificate and operator id on disk,
registered and renewed through ngrokd's real API client against the real
devcloud API (in memory, with L{StubTreq}).
"""

from __future__ import annotations

import datetime
import json
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.blocking import BlockingPool
from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud
from ngrokd.ngrok.api import APIError, APIUnavailable, HTTPRequester, NgrokAPI, Operator
from ngrokd.ngrok.identity import (
    CertificateMismatch,
    Identity,
    IdentityStore,
    IdentityUnreadable,
    RepairNeeded,
    StateDirNotWritable,
    generate_key,
    key_public_key,
    make_csr,
    needs_renewal,
    register,
    renew,
    repair,
)
from ngrokd.test.test_devcloud_api import start_devcloud_api
from ngrokd.test.threads import BlockingCalls, at_once

KEY = "2identitytestkey"
HOST = "host1"
SELECTORS = ["true"]
T = TypeVar("T")


class SpyAPI:
    """
    The real client, with hooks run before each call and a record of calls.
    """

    def __init__(self, api: NgrokAPI) -> None:
        self.api = api
        self.calls: list[str] = []
        self.before_register: Callable[[bytes], None] = lambda csr: None
        self.renew_csr: Callable[[str, bytes], bytes] = lambda id, csr: csr

    def register(
        self,
        description: str,
        metadata: str,
        selectors: Sequence[str],
        region: str,
        csr_pem: bytes,
    ) -> Deferred[Operator]:
        self.calls.append("register")
        self.before_register(csr_pem)
        return self.api.register(description, metadata, selectors, region, csr_pem)

    def renew(
        self, operator_id: str, csr_pem: bytes, selectors: Sequence[str]
    ) -> Deferred[Operator]:
        self.calls.append("renew")
        csr_pem = self.renew_csr(operator_id, csr_pem)
        return self.api.renew(operator_id, csr_pem, selectors)

    def operators(self) -> Deferred[list[Operator]]:
        self.calls.append("operators")
        return self.api.operators()


def _spki_of_cert(cert_pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class KeyTests(SynchronousTestCase):
    """
    The key and CSR are what the Go ngrokd makes and ngrok accepts.
    """

    def test_keyIsP384InSEC1PEM(self) -> None:
        """
        The key is ECDSA P-384, PEM "EC PRIVATE KEY".
        """
        pem = generate_key()
        self.assertTrue(pem.startswith(b"-----BEGIN EC PRIVATE KEY-----\n"))
        key = serialization.load_pem_private_key(pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp384r1")

    def test_csrHasEmptySubject(self) -> None:
        """
        The CSR has an empty subject, no extensions (so no SANs), a SHA-384
        signature that verifies, and the key's public key.
        """
        key = generate_key()
        csr = x509.load_pem_x509_csr(make_csr(key))
        self.assertEqual(csr.subject, x509.Name([]))
        self.assertEqual(list(csr.extensions), [])
        self.assertIsInstance(csr.signature_hash_algorithm, hashes.SHA384)
        self.assertTrue(csr.is_signature_valid)
        self.assertEqual(
            csr.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
            key_public_key(key),
        )


class IdentityTestCase(SynchronousTestCase):
    """
    A devcloud in memory, ngrokd's client for it, and a state directory.
    """

    cert_days = 90.0

    def setUp(self) -> None:
        self.cloud = Cloud(
            CertificateAuthority.create("t"), {KEY}, "ingress.test:443", self.cert_days
        )
        http = cast(
            HTTPRequester, StubTreq(api_resource(self.cloud, "https://api.test"))
        )
        self.api = SpyAPI(NgrokAPI("https://api.test", lambda: KEY, http, Clock()))
        self.state_dir = self.mktemp()
        self.store = IdentityStore(self.state_dir)

    def complete(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    def fails(self, d: Deferred[Any], *types: type) -> Any:
        return self.failureResultOf(d, *types).value

    def register(self) -> Identity:
        return self.complete(register(self.api, self.store, SELECTORS, HOST, at_once))

    def load(self) -> Identity | RepairNeeded | None:
        return IdentityStore(self.state_dir).load()

    def load_identity(self) -> Identity:
        loaded = self.load()
        assert isinstance(loaded, Identity), loaded
        return loaded

    def load_repair(self) -> RepairNeeded:
        loaded = self.load()
        assert isinstance(loaded, RepairNeeded), loaded
        return loaded

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)


class RegisterTests(IdentityTestCase):
    """
    First registration and what it leaves on disk.
    """

    def test_keyOnDiskBeforeRegistering(self) -> None:
        """
        The key file exists, mode 0600, holding the CSR's key, before ngrok
        is asked to register.
        """
        seen = []

        def check(csr: bytes) -> None:
            key = _read(self.path("tls.key"))
            seen.append(_mode(self.path("tls.key")))
            csr_key = x509.load_pem_x509_csr(csr).public_key()
            self.assertEqual(
                csr_key.public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                ),
                key_public_key(key),
            )

        self.api.before_register = check
        self.register()
        self.assertEqual(seen, [0o600])

    def test_files(self) -> None:
        """
        Registration leaves tls.key (0600), tls.crt (0644, the certificate for
        the key) and operator_id (0644, no newline), and tells ngrok which host
        this is.
        """
        identity = self.register()
        self.assertEqual(_mode(self.path("tls.key")), 0o600)
        self.assertEqual(_mode(self.path("tls.crt")), 0o644)
        self.assertEqual(_mode(self.path("operator_id")), 0o644)
        self.assertEqual(_read(self.path("operator_id")), identity.operator_id.encode())
        self.assertEqual(_read(self.path("tls.key")), identity.key_pem)
        self.assertEqual(_read(self.path("tls.crt")), identity.cert_pem)
        self.assertEqual(
            _spki_of_cert(identity.cert_pem), key_public_key(identity.key_pem)
        )
        self.assertEqual(identity.ingress_endpoint, "ingress.test:443")
        operator = self.cloud.get_operator(identity.operator_id)
        self.assertEqual(operator.description, "ngrokd on host1")
        self.assertEqual(
            json.loads(operator.metadata),
            {"hostname": "host1", "type": "forward-proxy"},
        )
        self.assertEqual(operator.selectors, ("true",))

    def test_restartReusesIdentity(self) -> None:
        """
        A restart loads the same identity and registers nothing.
        """
        identity = self.register()
        loaded = self.load_identity()
        self.assertEqual(
            (loaded.operator_id, loaded.cert_pem, loaded.key_pem),
            (identity.operator_id, identity.cert_pem, identity.key_pem),
        )
        self.assertEqual(loaded.not_after, identity.not_after)
        self.assertIsNone(loaded.ingress_endpoint)
        self.assertEqual(len(self.cloud.operators()), 1)

    def test_operatorIdWhitespace(self) -> None:
        """
        An operator_id written with a newline or spaces (by hand) still loads.
        """
        identity = self.register()
        _write(self.path("operator_id"), f"  {identity.operator_id}\n".encode())
        self.assertEqual(self.load_identity().operator_id, identity.operator_id)

    def test_nothingStored(self) -> None:
        """
        An empty or absent state directory has no identity.
        """
        self.assertIsNone(self.load())

    def test_stateDirNotWritable(self) -> None:
        """
        A state directory that cannot be created is reported before ngrok is
        asked for anything, so no operator is left behind.
        """
        blocker = self.mktemp()
        _write(blocker, b"")
        self.store = IdentityStore(os.path.join(blocker, "ngrokd"))
        error = self.fails(
            register(self.api, self.store, SELECTORS, HOST, at_once),
            StateDirNotWritable,
        )
        self.assertIn(blocker, str(error))
        self.assertEqual(self.api.calls, [])
        self.assertEqual(self.cloud.operators(), [])

    def test_stateDirIsAFile(self) -> None:
        """
        A regular file where the state directory should be is reported.
        """
        _write(self.state_dir, b"")
        error = self.assertRaises(StateDirNotWritable, self.store.check_writable)
        self.assertIn("not a directory", str(error))

    def test_stateDirCreated(self) -> None:
        """
        A missing state directory is created (0755) with its parents, and
        nothing is left in it by the check.
        """
        self.addCleanup(os.umask, os.umask(0o022))
        self.store = IdentityStore(os.path.join(self.state_dir, "a", "b"))
        self.store.check_writable()
        self.assertEqual(_mode(self.store.state_dir), 0o755)
        self.assertEqual(os.listdir(self.store.state_dir), [])

    def test_configuredPaths(self) -> None:
        """
        Configured certificate and key paths are written and read, the
        operator id stays in the state directory.
        """
        other = self.mktemp()
        cert, key = os.path.join(other, "c.pem"), os.path.join(other, "k.pem")
        self.store = IdentityStore(self.state_dir, cert, key)
        identity = self.register()
        self.assertEqual(_read(key), identity.key_pem)
        self.assertEqual(_read(cert), identity.cert_pem)
        self.assertEqual(sorted(os.listdir(self.state_dir)), ["operator_id"])
        loaded = IdentityStore(self.state_dir, cert, key).load()
        assert isinstance(loaded, Identity)
        self.assertEqual(loaded.key_pem, identity.key_pem)

    def test_emptyOperatorIdNeverStored(self) -> None:
        """
        Storing an empty operator id is refused.
        """
        self.assertRaises(ValueError, self.store.save_operator_id, " \n")


class RepairTests(IdentityTestCase):
    """
    Partial identities are reported and repaired without orphaning operators.
    """

    def test_missingOperatorId(self) -> None:
        """
        Key and certificate without operator_id need repair; repair finds the
        operator by its key instead of registering another.
        """
        identity = self.register()
        os.unlink(self.path("operator_id"))
        state = self.load_repair()
        self.assertIsNone(state.operator_id)
        self.assertIn("operator_id is missing", state.reason)
        self.assertEqual(state.public_key, key_public_key(identity.key_pem))
        repaired = self.complete(
            repair(self.api, self.store, state, SELECTORS, HOST, at_once)
        )
        self.assertEqual(repaired.operator_id, identity.operator_id)
        self.assertNotIn("register", self.api.calls[1:])
        self.assertEqual(len(self.cloud.operators()), 1)
        self.assertEqual(self.load_identity().operator_id, identity.operator_id)

    def test_emptyOperatorId(self) -> None:
        """
        An empty operator_id file is reported as such, not used.
        """
        self.register()
        _write(self.path("operator_id"), b"\n")
        state = self.load_repair()
        self.assertIsNone(state.operator_id)
        self.assertIn("empty", state.reason)

    def test_mismatch(self) -> None:
        """
        A certificate that is not the key's is reported; repair renews under
        the stored operator id.
        """
        identity = self.register()
        _write(self.path("tls.key"), generate_key())
        state = self.load_repair()
        self.assertIn("is not the certificate of", state.reason)
        self.assertEqual(state.operator_id, identity.operator_id)
        repaired = self.complete(
            repair(self.api, self.store, state, SELECTORS, HOST, at_once)
        )
        self.assertEqual(repaired.operator_id, identity.operator_id)
        self.assertEqual(self.api.calls, ["register", "renew"])
        loaded = self.load_identity()
        self.assertEqual(_spki_of_cert(loaded.cert_pem), key_public_key(loaded.key_pem))

    def test_corruptCertificate(self) -> None:
        """
        An unparseable certificate with a known operator id is renewed.
        """
        identity = self.register()
        _write(self.path("tls.crt"), b"garbage")
        state = self.load_repair()
        self.assertIn("no readable certificate", state.reason)
        self.complete(repair(self.api, self.store, state, SELECTORS, HOST, at_once))
        self.assertEqual(self.load_identity().operator_id, identity.operator_id)

    def test_unreadable(self) -> None:
        """
        A file that exists but cannot be read is an error naming it.
        """
        self.register()
        os.unlink(self.path("tls.crt"))
        os.mkdir(self.path("tls.crt"))
        error = self.assertRaises(IdentityUnreadable, self.load)
        self.assertIn(self.path("tls.crt"), str(error))

    def test_deletedOperator(self) -> None:
        """
        When ngrok no longer has the stored operator, repair registers anew
        and stores the new id.
        """
        identity = self.register()
        self.cloud.delete_operator(identity.operator_id)
        os.unlink(self.path("tls.crt"))
        state = self.load_repair()
        repaired = self.complete(
            repair(self.api, self.store, state, SELECTORS, HOST, at_once)
        )
        self.assertNotEqual(repaired.operator_id, identity.operator_id)
        self.assertEqual(self.load_identity().operator_id, repaired.operator_id)
        self.assertEqual([o.id for o in self.cloud.operators()], [repaired.operator_id])

    def test_crashBeforeAnswerSaved(self) -> None:
        """
        If ngrok registered the operator but ngrokd never saw the answer,
        the key left on disk finds that operator again: no second one.
        """

        def lose_answer(csr: bytes) -> None:
            self.api.api.register("d", "{}", SELECTORS, "global", csr)
            raise APIUnavailable("https://api.test", "connection lost")

        self.api.before_register = lose_answer
        self.fails(
            register(self.api, self.store, SELECTORS, HOST, at_once), APIUnavailable
        )
        [orphan] = self.cloud.operators()
        state = self.load_repair()
        self.assertIsNone(state.operator_id)
        self.api.before_register = lambda csr: None
        repaired = self.complete(
            repair(self.api, self.store, state, SELECTORS, HOST, at_once)
        )
        self.assertEqual(repaired.operator_id, orphan.id)
        self.assertEqual(len(self.cloud.operators()), 1)

    def test_unknownKeyRegisters(self) -> None:
        """
        A lone key no operator has leads to a new registration.
        """
        self.store.check_writable()
        self.store.save_key(generate_key())
        state = self.load_repair()
        repaired = self.complete(
            repair(self.api, self.store, state, SELECTORS, HOST, at_once)
        )
        self.assertEqual(self.api.calls, ["operators", "register"])
        self.assertEqual(self.load_identity().operator_id, repaired.operator_id)


class RenewTests(IdentityTestCase):
    """
    Renewal swaps in a new key only once ngrok certified it.
    """

    cert_days = 0.001

    def test_renewRotatesKey(self) -> None:
        """
        Renewing stores a new key and its certificate under the same operator.
        """
        identity = self.register()
        renewed = self.complete(
            renew(self.api, self.store, identity, SELECTORS, at_once)
        )
        self.assertEqual(renewed.operator_id, identity.operator_id)
        self.assertNotEqual(renewed.key_pem, identity.key_pem)
        loaded = self.load_identity()
        self.assertEqual(
            (loaded.key_pem, loaded.cert_pem), (renewed.key_pem, renewed.cert_pem)
        )
        self.assertEqual(_spki_of_cert(loaded.cert_pem), key_public_key(loaded.key_pem))
        self.assertEqual(_mode(self.path("tls.key")), 0o600)
        self.assertFalse(os.path.exists(self.path("tls.key.new")))

    def test_failedRenewalKeepsOldKey(self) -> None:
        """
        When the PATCH fails, the old key and certificate stay, usable.
        """
        identity = self.register()
        self.cloud.faults.next_status(503)
        self.fails(renew(self.api, self.store, identity, SELECTORS, at_once), APIError)
        loaded = self.load_identity()
        self.assertEqual(
            (loaded.key_pem, loaded.cert_pem), (identity.key_pem, identity.cert_pem)
        )
        self.assertFalse(os.path.exists(self.path("tls.key.new")))

    def test_oldCertificateRefused(self) -> None:
        """
        If ngrok answers with a certificate for another key (the old CSR's),
        nothing is replaced.
        """
        identity = self.register()
        self.api.renew_csr = lambda id, csr: self.cloud.get_operator(id).csr_pem
        error = self.fails(
            renew(self.api, self.store, identity, SELECTORS, at_once),
            CertificateMismatch,
        )
        self.assertIn(identity.operator_id, str(error))
        loaded = self.load_identity()
        self.assertEqual(loaded.key_pem, identity.key_pem)
        self.assertFalse(os.path.exists(self.path("tls.key.new")))

    def test_interruptedRenewalCompleted(self) -> None:
        """
        A crash after the new certificate was saved but before the new key
        was swapped in is finished on the next load.
        """
        identity = self.register()
        new_key = generate_key()
        self.store.save_pending_key(new_key)
        operator = self.cloud.update(identity.operator_id, csr_pem=make_csr(new_key))
        self.store.save_cert(operator.cert.cert_pem)
        loaded = self.load_identity()
        self.assertEqual(loaded.key_pem, new_key)
        self.assertEqual(_read(self.path("tls.key")), new_key)
        self.assertFalse(os.path.exists(self.path("tls.key.new")))

    def test_expiredStillLoads(self) -> None:
        """
        An expired certificate loads, says it is expired, and needs renewal.
        """
        identity = self.register()
        loaded = self.load_identity()
        later = loaded.not_after + datetime.timedelta(seconds=1)
        self.assertTrue(loaded.expired(later))
        self.assertFalse(loaded.expired(loaded.not_before))
        self.assertTrue(needs_renewal(loaded, later, datetime.timedelta(0)))
        self.assertEqual(loaded.not_after, identity.not_after)

    def test_needsRenewal(self) -> None:
        """
        Renewal is due from C{margin} before expiry on.
        """
        identity = self.register()
        margin = datetime.timedelta(seconds=30)
        before = identity.not_after - datetime.timedelta(seconds=31)
        self.assertFalse(needs_renewal(identity, before, margin))
        self.assertTrue(
            needs_renewal(identity, before + datetime.timedelta(seconds=1), margin)
        )


class OverHTTPSTests(TestCase):
    """
    Registration and renewal through the real client over real TLS.
    """

    timeout = 20

    @inlineCallbacks
    def test_registerRenewRestart(self):
        """
        Register, renew and load again against the devcloud over HTTPS: one
        operator, the renewed key and certificate on disk. Each file is
        written in the thread given, never on the reactor's.
        """
        devcloud = start_devcloud_api(self)
        state_dir = os.path.abspath(self.mktemp())
        store = IdentityStore(state_dir)
        pool = BlockingPool(IReactorFromThreads(reactor), "test-identity")
        pool.start()
        self.addCleanup(pool.stop)
        calls = BlockingCalls(self, lambda path: path.startswith(state_dir))
        identity = yield register(devcloud.api, store, SELECTORS, HOST, pool.run)
        renewed = yield renew(devcloud.api, store, identity, SELECTORS, pool.run)
        self.assertEqual(calls.functions(), {"write_atomic", "replace_durably"})
        self.assertEqual(calls.on_reactor_thread(), [])
        loaded = store.load()
        assert isinstance(loaded, Identity)
        self.assertEqual(loaded.operator_id, identity.operator_id)
        self.assertEqual(loaded.key_pem, renewed.key_pem)
        self.assertNotEqual(loaded.key_pem, identity.key_pem)
        operators = [o.id for o in devcloud.cloud.operators()]
        self.assertEqual(operators, [identity.operator_id])
