"""
The private parts of Twisted that ngrokd relies on, checked against the
installed Twisted. Each failure names the Twisted version, what changed and
what in ngrokd needs it: run this module first after upgrading Twisted.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import socket
import types
from typing import Any

import OpenSSL
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL.SSL import TLS_METHOD, Connection, Context
from twisted.internet import ssl, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import _parse
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import ILogObserver, LogBeginner, LogEvent, LogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import ngrokd
import twisted
from ngrokd.datapath.halfclose import (
    PYOPENSSL_INTERNALS,
    TLS_INTERNALS,
    HalfCloseableTLSProtocol,
)
from ngrokd.datapath.resumption import session_reused
from ngrokd.datapath.sendnow import TCP_INTERNALS, unsent
from ngrokd.datapath.splice import read_in_chunks
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.logs import observers_of

#: Where ngrokd imports from a private Twisted module, and what.
PRIVATE_IMPORTS = {
    ("ngrokd/ngrok/trust.py", "twisted.internet._sslverify", "IOpenSSLTrustRoot"),
}


def changed(what: str, needed_by: str) -> str:
    return f"Twisted {twisted.__version__} changed {what}: {needed_by}"


def half_close_needs(name: str) -> str:
    return changed(
        f"TLSMemoryBIOProtocol.{name}",
        f"ngrokd's TLS half-close (ngrokd/datapath/halfclose.py) needs it,"
        f" {TLS_INTERNALS[name]}",
    )


class RecordingTLS(TLSMemoryBIOProtocol):
    """
    Twisted's own TLS transport, recording when it runs the hooks that
    L{HalfCloseableTLSProtocol} overrides, with the state read after each.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, object]] = []

    def _write(self, data: bytes) -> None:
        self.calls.append(("_write", data))
        super()._write(data)


def _recording(name: str, state: str, copy: Any) -> Any:
    def hook(self: RecordingTLS) -> None:
        getattr(super(RecordingTLS, self), name)()
        self.calls.append((name, copy(getattr(self, state, None))))

    return hook


# Only the hooks the installed Twisted has: test_membersExist names the others.
for _name, _state, _copy in [
    ("_checkHandshakeStatus", "_handshakeDone", bool),
    ("_unbufferPendingWrites", "_appSendBuffer", list),
    ("_flushReceiveBIO", "_lostTLSConnection", bool),
    ("_flushSendBIO", "_handshakeDone", bool),
]:
    if hasattr(TLSMemoryBIOProtocol, _name):
        setattr(RecordingTLS, _name, _recording(_name, _state, _copy))


class Received(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class HalfCloseSeamTests(SynchronousTestCase):
    """
    L{TLSMemoryBIOProtocol}'s private members that the half-close relies on,
    on a client and a server talking in memory.
    """

    def setUp(self) -> None:
        ca = CertificateAuthority.create("seam test root")
        cert, key = ca.issue_server(["localhost"])
        server_options = ssl.PrivateCertificate.loadPEM(cert + key).options()
        client_options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem)
        )
        self.server_app = Received()
        self.server = self.connect(server_options, False, self.server_app)
        self.client = self.connect(client_options, True, Received())

    def connect(self, options: Any, is_client: bool, app: Protocol) -> Any:
        factory = TLSMemoryBIOFactory(
            options, is_client, Factory.forProtocol(lambda: app)
        )
        factory.protocol = RecordingTLS
        tls = factory.buildProtocol(None)
        assert tls is not None
        tls.makeConnection(StringTransport())
        return tls

    def pump(self) -> None:
        """
        Carry bytes both ways until neither side has anything to say.
        """
        for _ in range(50):
            moved = False
            for source, target in (
                (self.client, self.server),
                (self.server, self.client),
            ):
                data = source.transport.value()
                if data:
                    source.transport.clear()
                    target.dataReceived(data)
                    moved = True
            if not moved:
                return
        raise AssertionError("the TLS peers kept talking")

    def test_membersExist(self) -> None:
        """
        Every member the half-close overrides, reads or calls exists on a
        connected L{TLSMemoryBIOProtocol}.
        """
        missing = [name for name in TLS_INTERNALS if not hasattr(self.client, name)]
        if missing:
            self.fail("\n".join(map(half_close_needs, missing)))

    def test_everyMemberListed(self) -> None:
        """
        L{TLS_INTERNALS} lists every private member of Twisted's that
        L{HalfCloseableTLSProtocol} uses, so that this module checks them all.
        """
        tree = ast.parse(inspect.getsource(HalfCloseableTLSProtocol))
        used = {
            node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
        } | {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and (
                (isinstance(node.value, ast.Name) and node.value.id == "self")
                or (
                    isinstance(node.value, ast.Call)
                    and ast.unparse(node.value) == "super()"
                )
            )
        }
        private = {n for n in used if n.startswith("_") and not n.startswith("__")}
        twisteds = {n for n in private if hasattr(self.client, n)}
        self.assertEqual(
            twisteds - TLS_INTERNALS.keys(),
            set(),
            "HalfCloseableTLSProtocol uses these members of TLSMemoryBIOProtocol"
            " that halfclose.TLS_INTERNALS does not list",
        )

    def test_handshakeHook(self) -> None:
        """
        C{_checkHandshakeStatus} runs as the handshake advances, and
        C{_handshakeDone} is true once one of those runs completes it.
        """
        self.pump()
        for side in (self.client, self.server):
            self.assertIn(
                ("_checkHandshakeStatus", True),
                side.calls,
                half_close_needs("_checkHandshakeStatus"),
            )

    def test_pendingWritesHook(self) -> None:
        """
        A write made during the handshake waits in C{_appSendBuffer}, and
        C{_unbufferPendingWrites} empties it once the handshake is done.
        """
        self.client.write(b"early")
        self.assertEqual(
            (
                getattr(self.client, "_handshakeDone", None),
                getattr(self.client, "_appSendBuffer", None),
            ),
            (False, [b"early"]),
            half_close_needs("_appSendBuffer"),
        )
        self.pump()
        self.assertIn(
            ("_unbufferPendingWrites", []),
            self.client.calls,
            half_close_needs("_unbufferPendingWrites"),
        )
        self.assertEqual(self.server_app.received, b"early")

    def test_writeHook(self) -> None:
        """
        C{write} encrypts through C{_write}, and a write held during the
        handshake goes through it again once the handshake is done; OpenSSL's
        output goes out through C{_flushSendBIO}, the handshake's too.
        """
        self.client.write(b"early")
        self.pump()
        self.client.write(b"later")
        self.pump()
        self.assertEqual(
            [data for name, data in self.client.calls if name == "_write"],
            [b"early", b"early", b"later"],
            half_close_needs("_write"),
        )
        self.assertEqual(self.server_app.received, b"earlylater")
        self.assertIn(
            ("_flushSendBIO", False),
            self.client.calls,
            half_close_needs("_flushSendBIO"),
        )

    def test_closeNotify(self) -> None:
        """
        C{_shutdownTLS} sends close_notify and keeps TCP open until the peer
        answers with its own; the peer meets it in C{_flushReceiveBIO}, which
        ends TLS there.
        """
        self.pump()
        self.server._shutdownTLS()
        self.assertNotEqual(self.server.transport.value(), b"")
        self.assertFalse(
            self.server.transport.disconnecting, half_close_needs("_shutdownTLS")
        )
        self.pump()
        self.assertEqual(
            self.client.calls[-1],
            ("_flushReceiveBIO", True),
            half_close_needs("_flushReceiveBIO"),
        )
        self.assertTrue(
            self.client.transport.disconnecting and self.server.transport.disconnecting,
            half_close_needs("_tlsShutdownFinished"),
        )


class TrustRootSeamTests(SynchronousTestCase):
    """
    Twisted's private trust-root hook, which L{PartialChainTrust} provides.
    """

    def trust(self) -> Any:
        try:
            from ngrokd.ngrok.trust import PartialChainTrust
        except ImportError as e:
            self.fail(
                changed(
                    "twisted.internet._sslverify.IOpenSSLTrustRoot",
                    f"ngrokd/ngrok/trust.py cannot import it ({e})",
                )
            )
        contexts: list[object] = []
        self.patch(
            PartialChainTrust,
            "add_to_context",
            lambda self, context: contexts.append(context),
        )
        self.contexts = contexts
        return PartialChainTrust(system=False)

    def assertHookCalled(self, creator: Any, caller: str) -> None:
        """
        A TLS client connection made with C{creator} set its context up
        through the trust root's hook.
        """
        factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
        creator.clientConnectionForTLS(factory.buildProtocol(None))
        self.assertEqual(
            [type(context) for context in self.contexts],
            [Context],
            changed(
                f"how {caller} uses IOpenSSLTrustRoot._addCACertsToContext",
                "ngrokd's PartialChainTrust (ngrokd/ngrok/trust.py) needs it to"
                " let ngrok's intermediate CA anchor the chain",
            ),
        )

    def test_optionsForClientTLS(self) -> None:
        """
        The ingress's TLS settings reach L{PartialChainTrust} through the
        hook.
        """
        creator = ssl.optionsForClientTLS("ingress.test", trustRoot=self.trust())
        self.assertHookCalled(creator, "optionsForClientTLS")


@implementer(ILogObserver)
class Observer:
    def __call__(self, event: LogEvent) -> None:
        pass


class LogPublisherSeamTests(SynchronousTestCase):
    """
    The observer list of L{LogPublisher}, which the log level filter wraps.
    """

    def test_observersListed(self) -> None:
        """
        L{observers_of} lists the observers a publisher was given, added and
        not removed, and those a L{LogBeginner} installs, as twistd's is.
        """
        first, second, installed = Observer(), Observer(), Observer()
        publisher = LogPublisher(first)
        publisher.addObserver(second)
        publisher.removeObserver(first)
        beginner = LogBeginner(
            publisher,
            io.StringIO(),
            types.SimpleNamespace(),
            types.SimpleNamespace(showwarning=None),
        )
        beginner.beginLoggingTo([installed], redirectStandardIO=False)
        message = changed(
            "LogPublisher._observers",
            "ngrokd's server.log_level (ngrokd/logs.py) needs the observers"
            " twistd installed",
        )
        try:
            observers = observers_of(publisher)
        except AttributeError:
            self.fail(message)
        self.assertEqual(observers, [second, installed], message)


class TransportBufferSeamTests(SynchronousTestCase):
    """
    The write buffer of Twisted's TCP transport, which the slow-reader tests
    measure.
    """

    def test_unsentCounted(self) -> None:
        """
        L{unsent} counts what was written and not yet sent, in both of the
        buffers a L{FileDescriptor} keeps.
        """

        class OneByteAtATime(FileDescriptor):
            def writeSomeData(self, data: bytes) -> int:
                return 1

        transport = OneByteAtATime(MemoryReactor())
        transport.connected = True
        transport.write(b"abc")
        counts = [unsent(transport)]
        transport.doWrite()
        transport.write(b"de")
        counts.append(unsent(transport))
        self.assertEqual(
            counts,
            [3, 4],
            changed(
                "FileDescriptor's write buffer (dataBuffer, offset, _tempDataLen)",
                "ngrokd's splice (ngrokd/datapath/sendnow.py, unsent) sends at"
                " once only when nothing is queued, and the slow-reader tests"
                " measure what the daemon holds with it",
            ),
        )


class Pieces(Protocol):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.sizes.append(len(data))


@implementer(IPushProducer)
class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class ChunkReaderCase(SynchronousTestCase):
    """
    A TCP transport made to read in chunks (L{read_in_chunks} with
    C{chunk_sizes}), on one end of a non-blocking socket pair.
    """

    chunk_sizes: tuple[int, ...] = ()

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.received = Pieces()
        self.transport = tcp.Connection(self.ours, self.received, MemoryReactor())
        self.transport.connected = True  # as an accepted connection is
        self.received.makeConnection(self.transport)
        read_in_chunks(self.transport, *self.chunk_sizes)


class TCPChunkSeamTests(ChunkReaderCase):
    """
    C{bufferSize} and C{doRead} on Twisted's TCP transport, which
    L{ngrokd.datapath.splice.read_in_chunks} sets.
    """

    chunk_sizes = (1000, 1000)

    def test_sendNowMembersExist(self) -> None:
        """
        Every private member L{send_now} reads exists on a connected TCP
        transport.
        """
        missing = [n for n in TCP_INTERNALS if not hasattr(self.transport, n)]
        self.assertEqual(
            missing,
            [],
            changed(
                "tcp.Connection's members",
                "ngrokd's splice (ngrokd/datapath/sendnow.py) reads them to"
                " send at once while nothing is queued",
            ),
        )

    def test_readSize(self) -> None:
        """
        A read takes up to the size asked for off the socket.
        """
        self.theirs.sendall(b"x" * 2500)
        for _ in range(3):
            self.transport.doRead()
        self.assertEqual(
            self.received.sizes,
            [1000, 1000, 500],
            changed(
                "what tcp.Connection's doRead, socket and protocol are",
                "ngrokd's splice (ngrokd/datapath/splice.py, read_in_chunks)"
                " reads in big chunks with its own doRead",
            ),
        )

    def test_bufferBound(self) -> None:
        """
        A write that leaves more than C{bufferSize} bytes unsent pauses the
        registered producer.
        """
        producer = Producer()
        self.transport.registerProducer(producer, True)
        self.transport.write(b"x" * 1000)
        paused = [producer.paused]
        self.transport.write(b"x")
        paused.append(producer.paused)
        self.assertEqual(
            paused,
            [False, True],
            changed(
                "what tcp.Connection.bufferSize means to write",
                "ngrokd's splice (ngrokd/datapath/splice.py, read_in_chunks)"
                " relies on it to bound what a slow reader makes it hold",
            ),
        )


class PyOpenSSLSeamTests(SynchronousTestCase):
    """
    L{HalfCloseableTLSProtocol} decrypts and asks for whole writes through
    pyOpenSSL's private members and cryptography's bindings.
    """

    def test_membersExist(self) -> None:
        """
        Every member in L{PYOPENSSL_INTERNALS} exists on a C{Connection}, and
        the bindings have the OpenSSL calls it makes.
        """
        connection = Connection(Context(TLS_METHOD))
        missing = [n for n in PYOPENSSL_INTERNALS if not hasattr(connection, n)]
        missing += [
            name
            for name in ("SSL_read", "SSL_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE")
            if not hasattr(Binding.lib, name)
        ]
        self.assertEqual(
            missing,
            [],
            f"pyOpenSSL {OpenSSL.__version__} or cryptography changed: ngrokd's"
            " TLS (ngrokd/datapath/halfclose.py) needs these",
        )


class SessionReusedSeamTests(SynchronousTestCase):
    """
    L{ngrokd.datapath.resumption.session_reused} reads pyOpenSSL's private
    C{Connection._ssl} and calls OpenSSL through cryptography's bindings.
    """

    def test_fresh(self) -> None:
        """
        A connection that has not handshaken has not resumed; a change in
        either library fails here, naming what is gone.
        """
        connection = Connection(Context(TLS_METHOD))
        self.assertTrue(
            hasattr(connection, "_ssl"),
            f"pyOpenSSL {OpenSSL.__version__} has no Connection._ssl: ngrokd's"
            " count of resumed handshakes (ngrokd/datapath/resumption.py) needs it",
        )
        self.assertFalse(session_reused(connection))


class PrivateImportTests(SynchronousTestCase):
    """
    No module of ngrokd imports from a private Twisted module but the ones
    this file checks.
    """

    def test_onlyKnownPrivateImports(self) -> None:
        """
        Every import from a private Twisted module in ngrokd is listed in
        L{PRIVATE_IMPORTS}.
        """
        package = os.path.dirname(ngrokd.__file__)
        found = set()
        for directory, _, files in os.walk(package):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    where = os.path.relpath(path, os.path.dirname(package))
                    found |= {(where, *i) for i in _private_twisted_imports(path)}
        self.assertEqual(found - PRIVATE_IMPORTS, set(), "not checked here")
        self.assertEqual(PRIVATE_IMPORTS - found, set(), "no longer imported")


def _private_twisted_imports(path: str) -> set[tuple[str, str]]:
    """
    (module, name) for each import from a private Twisted module in C{path}.
    """
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names}
    return {
        (module, name)
        for module, name in found
        if module.split(".")[0] == "twisted"
        and any(part.startswith("_") for part in module.split("."))
    }


class EndpointDescriptionSeamTests(SynchronousTestCase):
    """
    C{twisted.internet.endpoints._parse}, which reads C{server.socket_path}
    as Twisted's own C{serverFromString} does.
    """

    def test_parse(self) -> None:
        """
        A description splits into its type and positional fields, then its
        C{key=value} fields, with backslash escapes undone.
        """
        self.assertEqual(
            _parse("unix:/run/a\\:b.sock:600:mode=660"),
            (["unix", "/run/a:b.sock", "600"], {"mode": "660"}),
            changed(
                "endpoints._parse",
                "ngrokd's control socket (ngrokd/control/address.py) needs it"
                " to apply its mode to unix: and loopback to tcp:",
            ),
        )


class ExitSignalSeamTests(SynchronousTestCase):
    """
    The reactor's C{_exitSignal}, which L{ngrokd.signals.StopOnSignal} sets
    and twistd reads to end by the signal the daemon stopped for.
    """

    def test_twistdReadsIt(self) -> None:
        """
        Reactors have C{_exitSignal}, and twistd's runner reads it once the
        reactor has stopped.
        """
        from twisted.application.app import ApplicationRunner
        from twisted.internet.base import ReactorBase

        needed = changed(
            "the reactor's _exitSignal",
            "ngrokd.signals.StopOnSignal sets it so that twistd ends by the"
            " signal the daemon stopped for, as systemd expects",
        )
        self.assertTrue(hasattr(ReactorBase, "_exitSignal"), needed)
        self.assertIn(
            "reactor._exitSignal",
            inspect.getsource(ApplicationRunner.startReactor),
            needed,
        )
