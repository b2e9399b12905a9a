"""
Tests for L{ngrokd.devcloud.tap}, L{ngrokd.devcloud.config} and
L{ngrokd.devcloud.admin}: the command line, the files the devcloud writes,
and a running devcloud used the way ngrokd uses it, over real TLS on
loopback.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from ngrokd.config import load_config, parse_config
from ngrokd.datapath import wire
from ngrokd.datapath.halfclose import HalfCloseableTLSClientEndpoint
from ngrokd.devcloud.admin import parse_backend
from ngrokd.devcloud.config import DaemonSettings, render_daemon_config
from ngrokd.devcloud.ingress import IngressFault
from ngrokd.devcloud.tap import (
    DEFAULT_API_PORT,
    DEFAULT_INGRESS_PORT,
    DevcloudStateError,
    Options,
    makeService,
    start_devcloud,
)
from ngrokd.ngrok.trust import client_creator, load_api_trust, load_ingress_trust
from ngrokd.test.test_devcloud_ingress import Peer, new_csr, register, split_response

#: The real reactor, for loopback I/O (untyped: it provides many interfaces).
reactor: Any = _reactor


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """
    The command line of C{twistd ngrokd-devcloud}.
    """

    def test_defaults(self):
        """
        Only --state is needed; the API and ingress default to ports 4443
        and 4444 on 127.0.0.1, with no endpoints.
        """
        settings = parse("--state", "d").settings()
        self.assertEqual(
            (
                settings.state_dir,
                settings.host,
                settings.api_port,
                settings.ingress_port,
                settings.endpoints,
                settings.api_key,
            ),
            (
                os.path.abspath("d"),
                "127.0.0.1",
                DEFAULT_API_PORT,
                DEFAULT_INGRESS_PORT,
                (),
                None,
            ),
        )

    def test_stateRequired(self):
        """
        Without --state the command line is refused, saying so.
        """
        error = self.assertRaises(UsageError, parse, "--api-port", "0")
        self.assertIn("--state", str(error))

    def test_endpoints(self):
        """
        --endpoint is repeatable; each binds a URL to a backend HOST:PORT.
        """
        settings = parse(
            "--state=d",
            "--endpoint=tcp://db.prod:5432=127.0.0.1:15432",
            "-e",
            "http://web.prod=[::1]:8080",
        ).settings()
        self.assertEqual(
            settings.endpoints,
            (
                ("tcp://db.prod:5432", ("127.0.0.1", 15432)),
                ("http://web.prod", ("::1", 8080)),
            ),
        )

    def test_badEndpoint(self):
        """
        A malformed --endpoint is refused with a message quoting it.
        """
        for value in [
            "tcp://db.prod:5432",
            "ftp://files.prod=127.0.0.1:21",
            "tcp://db.prod=127.0.0.1:5432",
            "http://web.prod=127.0.0.1",
            "http://web.prod=127.0.0.1:70000",
            "http://web.prod=:80",
            "http://=127.0.0.1:80",
        ]:
            error = self.assertRaises(
                UsageError, parse, "--state", "d", "--endpoint", value
            )
            self.assertIn(repr(value), str(error))

    def test_duplicateEndpoint(self):
        """
        Two --endpoint URLs for the same host and port are refused, naming
        both.
        """
        error = self.assertRaises(
            UsageError,
            parse,
            "--state=d",
            "--endpoint=http://web.prod=127.0.0.1:1",
            "--endpoint=http://web.prod:80=127.0.0.1:2",
        )
        self.assertIn("'http://web.prod'", str(error))
        self.assertIn("'http://web.prod:80'", str(error))

    def test_badPorts(self):
        """
        Ports must be numbers in 0..65535 (0: any free port); ngrokd's first
        port must be at least 1.
        """
        for argv in [
            ["--api-port", "65536"],
            ["--ingress-port", "x"],
            ["--start-port", "0"],
            ["--poll-interval", "0"],
        ]:
            self.assertRaises(UsageError, parse, "--state", "d", *argv)
        self.assertEqual(parse("--state=d", "--api-port=0")["api-port"], 0)


class ConfigTests(SynchronousTestCase):
    """
    The ngrokd configuration written for a devcloud.
    """

    def test_quoting(self):
        """
        Values that YAML would misread unquoted (a key with quotes, a path
        with a colon and a hash) come back exactly.
        """
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        config = os.path.join(path, "ngrokd.yml")
        with open(config, "w") as f:
            f.write(
                render_daemon_config(
                    config,
                    DaemonSettings(
                        api_url="https://127.0.0.1:1",
                        api_key='k"e: #y',
                        ingress_endpoint="127.0.0.1:2",
                        api_ca_path="/a: #b/ca.crt",
                        ingress_ca_path="/c/ingress-ca.pem",
                        state_dir="/s",
                    ),
                )
            )
        with open(config) as f:
            text = f.read()
        # Parsed, not loaded: the CA bundles it names do not exist.
        loaded = parse_config(text, config, {"NGROK_API_KEY": "other"}, "linux")
        self.assertEqual(loaded.warnings, ())
        self.assertEqual(
            (loaded.config.api.key, loaded.config.api.ca_bundle),
            ('k"e: #y', "/a: #b/ca.crt"),
        )


class ParseBackendTests(SynchronousTestCase):
    def test_forms(self):
        """
        Backends are host:port, with IPv6 addresses in brackets.
        """
        self.assertEqual(parse_backend("localhost:80"), ("localhost", 80))
        self.assertEqual(parse_backend("[::1]:443"), ("::1", 443))


class DevcloudServiceTests(TestCase):
    """
    The plugin's service, and the devcloud it runs, on 127.0.0.1.
    """

    timeout = 20

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        self.backends: list[Peer] = []

        def build() -> Peer:
            peer = Peer(echo=True)
            self.backends.append(peer)
            return peer

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.backend = port.getHost().port

    def start(self, *argv: str):
        options = parse(
            "--state",
            self.state,
            "--api-port=0",
            "--ingress-port=0",
            f"--endpoint=tcp://db.prod:5432=127.0.0.1:{self.backend}",
            *argv,
        )
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.devcloud is not None
        return service, service.devcloud

    def info(self) -> dict[str, Any]:
        with open(os.path.join(self.state, "devcloud.json")) as f:
            info: dict[str, Any] = json.load(f)
        return info

    def mode(self, name: str) -> int:
        return stat.S_IMODE(os.stat(os.path.join(self.state, name)).st_mode)

    def http(self, ca_bundle: str):
        """
        A treq client verifying the server with C{ca_bundle}, as ngrokd's.
        """
        from treq.client import HTTPClient

        pool = HTTPConnectionPool(reactor, persistent=False)
        policy = BrowserLikePolicyForHTTPS(load_api_trust(ca_bundle))
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, key: str | None = None):
        """
        Call the running devcloud's API server; the status and JSON body.
        """
        devcloud = self.devcloud
        headers = {
            "Authorization": f"Bearer {key or devcloud.api_key}",
            "Ngrok-Version": "2",
        }
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response = yield self.http(devcloud.api_ca_path).request(
            method, devcloud.api_url + path, headers=headers, data=data
        )
        content = yield response.content()
        return response.code, json.loads(content) if content else None

    def test_writesLoadableConfig(self):
        """
        Started with port 0, the devcloud writes an ngrokd.yml that ngrokd
        loads without warnings and that names the ports actually bound, the
        CA bundles, and a state directory, socket and hosts file that need
        no root; devcloud.json gives the same addresses and the key.
        """
        _, devcloud = self.start()
        info = self.info()
        loaded = load_config(devcloud.config_path, environ={})
        config = loaded.config
        self.assertEqual(loaded.warnings, ())
        api_port, ingress_port = devcloud.api_address[1], devcloud.ingress_address[1]
        self.assertNotIn(0, (api_port, ingress_port))
        self.assertEqual(
            info,
            {
                "api_url": f"https://127.0.0.1:{api_port}",
                "ingress": f"127.0.0.1:{ingress_port}",
                "api_key": devcloud.api_key,
                "ports": {"api": api_port, "ingress": ingress_port},
                "config": devcloud.config_path,
                "api_ca": os.path.join(self.state, "ca.crt"),
                "ingress_ca": os.path.join(self.state, "ingress-ca.pem"),
            },
        )
        daemon_state = os.path.join(self.state, "ngrokd")
        self.assertEqual(
            (
                config.api.url,
                config.api.key,
                config.api.ca_bundle,
                config.ingress.endpoint,
                config.ingress.ca_bundle,
                config.ingress.insecure_skip_verify,
                config.server.state_dir,
                config.server.socket_path,
                config.net.hosts_file,
                config.net.listen_interface,
                config.net.start_port,
            ),
            (
                info["api_url"],
                info["api_key"],
                info["api_ca"],
                info["ingress"],
                info["ingress_ca"],
                False,
                daemon_state,
                os.path.join(daemon_state, "ngrokd.sock"),
                os.path.join(daemon_state, "hosts"),
                "127.0.0.1",
                9080,
            ),
        )
        self.assertTrue(os.path.isfile(config.net.hosts_file))
        self.assertEqual(
            [self.mode(n) for n in ("ca.key", "ingress-ca.key", "api-key")],
            [0o600] * 3,
        )
        self.assertEqual(
            [self.mode(n) for n in ("ngrokd.yml", "devcloud.json")], [0o600] * 2
        )

    def test_ingressCAIsTheIntermediate(self):
        """
        The ingress CA bundle holds one certificate, a CA that is not
        self-signed: ngrokd has to trust an intermediate, as with ngrok.
        """
        from cryptography import x509

        _, devcloud = self.start()
        with open(devcloud.ingress_ca_path, "rb") as f:
            certificates = x509.load_pem_x509_certificates(f.read())
        [intermediate] = certificates
        self.assertNotEqual(intermediate.issuer, intermediate.subject)

    @inlineCallbacks
    def test_asNgrokdUsesIt(self):
        """
        With only what ngrokd.yml says, a client registers through the API
        (verified with api.ca_bundle), then reaches a bound endpoint through
        the ingress (verified with ingress.ca_bundle, an intermediate), and
        the ingress endpoint the API reports is the one in the file.
        """
        self.devcloud = devcloud = self.start()[1]
        config = load_config(devcloud.config_path, environ={}).config
        key_pem, csr_pem = new_csr()
        status, operator = yield self.call(
            "POST",
            "/kubernetes_operators",
            {
                "description": "test",
                "metadata": "{}",
                "enabled_features": ["bindings"],
                "region": "global",
                "deployment": {"name": "ngrokd", "namespace": "default"},
                "binding": {"endpoint_selectors": ["true"], "csr": csr_pem.decode()},
            },
        )
        self.assertEqual(status, 201)
        self.assertEqual(
            operator["binding"]["ingress_endpoint"], config.ingress.endpoint
        )
        certificate = ssl.PrivateCertificate.loadPEM(
            operator["binding"]["cert"]["cert"].encode() + key_pem
        )
        creator = client_creator(
            config.ingress.host,
            load_ingress_trust(config.ingress.ca_bundle),
            certificate,
        )
        client = Peer()
        tcp = TCP4ClientEndpoint(reactor, config.ingress.host, config.ingress.port)
        yield HalfCloseableTLSClientEndpoint(creator, tcp).connect(
            Factory.forProtocol(lambda: client)
        )
        client.transport.write(
            wire.encode_request(wire.ConnRequest("db.prod", 5432)) + b"hi"
        )
        expected = wire.ConnResponse(
            devcloud.cloud.find_endpoint("db.prod", 5432).id, "tcp"
        )
        received = yield client.receivedAtLeast(len(wire.encode_response(expected)) + 2)
        self.assertEqual(split_response(received), (expected, b"hi"))
        self.assertEqual(devcloud.ingress.connections_total, 1)
        client.transport.loseConnection()
        yield client.lost

    @inlineCallbacks
    def test_adminEndpoints(self):
        """
        Endpoints are listed, bound and unbound at runtime with the admin
        routes, and the cloud follows.
        """
        self.devcloud = devcloud = self.start()[1]
        status, created = yield self.call(
            "POST",
            "/_devcloud/endpoints",
            {"url": "http://web.prod", "backend": "127.0.0.1:8080"},
        )
        self.assertEqual(status, 201)
        self.assertEqual(
            (created["url"], created["proto"], created["backend"]),
            ("http://web.prod", "http", "127.0.0.1:8080"),
        )
        self.assertEqual(devcloud.cloud.find_endpoint("web.prod", 80).id, created["id"])
        status, listed = yield self.call("GET", "/_devcloud/endpoints")
        self.assertEqual(
            sorted(e["url"] for e in listed["endpoints"]),
            ["http://web.prod", "tcp://db.prod:5432"],
        )
        status, _ = yield self.call(
            "DELETE", "/_devcloud/endpoints?url=tcp%3A%2F%2Fdb.prod%3A5432"
        )
        self.assertEqual(status, 204)
        self.assertIsNone(devcloud.cloud.find_endpoint("db.prod", 5432))

    @inlineCallbacks
    def test_adminRefusals(self):
        """
        The admin routes need the API key, refuse bad values naming them, and
        say 404 for an endpoint that is not bound.
        """
        self.devcloud = self.start()[1]
        status, body = yield self.call("GET", "/_devcloud/endpoints", key="wrong")
        self.assertEqual(status, 403)
        status, body = yield self.call(
            "POST", "/_devcloud/endpoints", {"url": "http://a.b", "backend": "x"}
        )
        self.assertEqual((status, body["status_code"]), (400, 400))
        self.assertIn("'x'", body["msg"])
        status, body = yield self.call(
            "POST", "/_devcloud/endpoints", {"url": "gopher://a.b", "backend": "x:1"}
        )
        self.assertEqual(status, 400)
        self.assertIn("gopher://a.b", body["msg"])
        status, body = yield self.call(
            "DELETE", "/_devcloud/endpoints?url=http%3A%2F%2Fnope.prod"
        )
        self.assertEqual(status, 404)
        self.assertIn("http://nope.prod", body["msg"])

    @inlineCallbacks
    def test_adminFaults(self):
        """
        Faults set through the admin routes reach the ingress and the API,
        and one call clears them all.
        """
        self.devcloud = devcloud = self.start()[1]
        status, _ = yield self.call(
            "PUT",
            "/_devcloud/faults/ingress",
            {"url": "tcp://db.prod:5432", "notices": ["maintenance at 5"]},
        )
        self.assertEqual(status, 204)
        self.assertEqual(
            devcloud.ingress.faults,
            {("db.prod", 5432): IngressFault(notices=("maintenance at 5",))},
        )
        status, body = yield self.call(
            "PUT",
            "/_devcloud/faults/ingress",
            {"url": "tcp://db.prod:5432", "stall": True, "hang_up": True},
        )
        self.assertEqual(status, 400)
        status, _ = yield self.call(
            "POST",
            "/_devcloud/faults/api",
            {"status": 503, "retry_after": 7, "path_contains": "kubernetes_operators"},
        )
        self.assertEqual(status, 204)
        status, body = yield self.call("GET", "/kubernetes_operators")
        self.assertEqual(status, 503)
        status, switches = yield self.call(
            "PATCH", "/_devcloud/faults/api", {"bindings_enabled": False}
        )
        self.assertEqual(
            (status, switches["bindings_enabled"], devcloud.cloud.bindings_enabled),
            (200, False, False),
        )
        status, _ = yield self.call("DELETE", "/_devcloud/faults")
        self.assertEqual(status, 204)
        self.assertEqual(
            (devcloud.ingress.faults, devcloud.cloud.bindings_enabled), ({}, True)
        )
        status, body = yield self.call("GET", "/kubernetes_operators")
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_restartKeepsIdentity(self):
        """
        Started again on the same directory, the devcloud keeps its CA, its
        intermediate and its API key, so what ngrokd holds stays valid.
        """
        service, first = self.start()
        names = ["ca.crt", "ca.key", "ingress-ca.pem", "ingress-ca.key"]

        def read() -> list[bytes]:
            contents = []
            for name in names:
                with open(os.path.join(self.state, name), "rb") as f:
                    contents.append(f.read())
            return contents

        before = read()
        yield service.stopService()
        second = self.start()[1]
        self.assertEqual((read(), second.api_key), (before, first.api_key))

    @inlineCallbacks
    def test_restartKeepsOperators(self):
        """
        Operators registered before a restart are still known after it, with
        their certificates, so a daemon's stored operator id keeps working;
        a deleted one stays deleted.
        """
        from ngrokd.ngrok.identity import generate_key, make_csr

        service, first = self.start()
        kept = first.cloud.register(
            "kept", "{}", ["bindings"], "global", {}, ["true"], make_csr(generate_key())
        )
        gone = first.cloud.register(
            "gone", "{}", ["bindings"], "global", {}, ["true"], make_csr(generate_key())
        )
        first.cloud.delete_operator(gone.id)
        self.assertEqual(self.mode("operators.json"), 0o600)
        yield service.stopService()
        second = self.devcloud = self.start()[1]
        self.assertEqual(second.cloud.operators(), [kept])
        status, body = yield self.call("GET", f"/kubernetes_operators/{kept.id}")
        self.assertEqual((status, body["id"]), (200, kept.id))

    @inlineCallbacks
    def test_stopClosesEverything(self):
        """
        Stopping the service closes its ports and the connections it carries,
        the backend's included.
        """
        service, devcloud = self.start()
        certificate = register(devcloud.cloud)[0]
        creator = client_creator(
            "127.0.0.1", load_ingress_trust(devcloud.ingress_ca_path), certificate
        )
        client = Peer()
        ingress = TCP4ClientEndpoint(reactor, "127.0.0.1", devcloud.ingress_address[1])
        yield HalfCloseableTLSClientEndpoint(creator, ingress).connect(
            Factory.forProtocol(lambda: client)
        )
        client.transport.write(wire.encode_request(wire.ConnRequest("db.prod", 5432)))
        yield client.receivedAtLeast(3)
        yield service.stopService()
        yield client.lost
        yield self.backends[0].lost
        for port in (devcloud.api_address[1], devcloud.ingress_address[1]):
            yield self.assertFailure(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                    Factory.forProtocol(Protocol)
                ),
                ConnectionRefusedError,
            )

    def test_portTaken(self):
        """
        A port in use fails the start with the reason, and leaves nothing
        listening.
        """
        taken = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(taken.stopListening)
        options = parse(
            "--state",
            self.state,
            "--ingress-port=0",
            f"--api-port={taken.getHost().port}",
        )
        service = makeService(options, reactor)
        self.assertRaises(CannotListenError, service.startService)
        self.assertIsNone(service.devcloud)

    def test_unusableState(self):
        """
        A CA certificate without its key is refused, naming the missing file.
        """
        os.makedirs(self.state)
        with open(os.path.join(self.state, "ca.crt"), "w") as f:
            f.write("x")
        error = self.assertRaises(
            DevcloudStateError, start_devcloud, reactor, self.state
        )
        self.assertIn(os.path.join(self.state, "ca.key"), str(error))

    @inlineCallbacks
    def test_startDevcloud(self):
        """
        In-process, L{start_devcloud} serves on free ports with the given
        endpoints, and endpoints can be added and removed on its cloud.
        """
        devcloud = start_devcloud(
            reactor, self.state, [("http://web.prod", ("127.0.0.1", self.backend))]
        )
        self.addCleanup(devcloud.stop)
        web = devcloud.cloud.find_endpoint("web.prod", 80)
        assert web is not None
        self.assertEqual(web.backend, ("127.0.0.1", self.backend))
        devcloud.cloud.add_endpoint("tcp://db.prod:5432", ("127.0.0.1", 1))
        devcloud.cloud.remove_endpoint("http://web.prod")
        self.assertEqual(
            [e.url for e in devcloud.cloud.endpoints()], ["tcp://db.prod:5432"]
        )
        self.assertTrue(os.path.exists(devcloud.config_path))
        yield devcloud.stop()
