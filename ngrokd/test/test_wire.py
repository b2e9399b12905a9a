"""
Tests for L{ngrokd.datapath.wire}: the bytes must match ngrok's binding ingress exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath import conn_header_pb2, wire


def _proto_dir() -> str:
    """
    The directory of C{conn_header.proto}, installed beside its generated module.
    """
    return os.path.dirname(conn_header_pb2.__file__)


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


class RequestVectorTests(SynchronousTestCase):
    """
    Requests encode to the test vectors of the protocol reference.
    """

    def test_emptyIdentity(self) -> None:
        """
        ngrok's operator always sends a pod identity, even an empty one.
        """
        self.assertEqual(
            wire.encode_request(wire.ConnRequest("svc.ns", 80)),
            _hex("0c 00 0a 06 73 76 63 2e 6e 73 10 50 1a 00"),
        )

    def test_noIdentity(self) -> None:
        """
        Without an identity field the frame has only host and port.
        """
        self.assertEqual(
            wire.encode_request(wire.ConnRequest("db.prod", 5432, pod_identity=None)),
            _hex("0c 00 0a 07 64 62 2e 70 72 6f 64 10 b8 2a"),
        )

    def test_fullIdentity(self) -> None:
        """
        Every identity field, annotations included, is encoded in field order.
        """
        identity = wire.PodIdentity(
            uid="uid-1",
            name="web-0",
            namespace="prod",
            annotations={"ngrok.com/team": "core"},
        )
        self.assertEqual(
            wire.encode_request(wire.ConnRequest("api.prod", 443, identity)),
            _hex(
                "3b 00 0a 08 61 70 69 2e 70 72 6f 64 10 bb 03 1a 2c 0a 05 75 69 64"
                " 2d 31 12 05 77 65 62 2d 30 1a 04 70 72 6f 64 22 16 0a 0e 6e 67"
                " 72 6f 6b 2e 63 6f 6d 2f 74 65 61 6d 12 04 63 6f 72 65"
            ),
        )

    def test_requestRoundTrip(self) -> None:
        """
        The ingress side decodes what the client side encodes.
        """
        request = wire.ConnRequest(
            "api.prod", 443, wire.PodIdentity(uid="u", annotations={"a": "b"})
        )
        reader = wire.FrameReader()
        result = reader.feed(wire.encode_request(request))
        assert result is not None
        self.assertEqual(wire.decode_request(result[0]), request)


class ResponseVectorTests(SynchronousTestCase):
    """
    Responses decode from the test vectors of the protocol reference.
    """

    vectors = [
        (
            "0b 00 0a 04 65 70 5f 31 12 03 74 63 70",
            wire.ConnResponse(endpoint_id="ep_1", proto="tcp"),
        ),
        (
            "19 00 0a 04 65 70 5f 31 12 04 68 74 74 70 2a 0b 0a 09 73 6c 6f 77 20"
            " 64 6f 77 6e",
            wire.ConnResponse(endpoint_id="ep_1", proto="http", notices=("slow down",)),
        ),
        (
            "1d 00 1a 0e 45 52 52 5f 4e 47 52 4f 4b 5f 33 32 30 30 22 0b 6e 6f 20"
            " 65 6e 64 70 6f 69 6e 74",
            wire.ConnResponse(error_code="ERR_NGROK_3200", error_message="no endpoint"),
        ),
    ]

    def test_decode(self) -> None:
        """
        Each vector decodes to its message.
        """
        for text, expected in self.vectors:
            result = wire.FrameReader().feed(_hex(text))
            assert result is not None
            self.assertEqual(
                (wire.decode_response(result[0]), result[1]), (expected, b"")
            )

    def test_encode(self) -> None:
        """
        The devcloud's ingress writes exactly the vectors.
        """
        for text, response in self.vectors:
            self.assertEqual(wire.encode_response(response), _hex(text))

    def test_refused(self) -> None:
        """
        A response with an error code or message is a refusal; one without is not.
        """
        self.assertEqual(
            [response.refused for _, response in self.vectors], [False, False, True]
        )
        self.assertTrue(wire.ConnResponse(error_message="x").refused)

    def test_fieldsInAnyOrderAndUnknownSkipped(self) -> None:
        """
        A decoder accepts fields out of order and skips fields it does not know.
        """
        payload = _hex("12 03 74 63 70") + _hex("78 07") + _hex("0a 04 65 70 5f 31")
        self.assertEqual(
            wire.decode_response(payload),
            wire.ConnResponse(endpoint_id="ep_1", proto="tcp"),
        )

    def test_malformed(self) -> None:
        """
        Bytes that are not a ConnResponse raise L{wire.MalformedFrame}.
        """
        self.assertRaises(wire.MalformedFrame, wire.decode_response, b"\x0a\x09ab")
        self.assertRaises(wire.MalformedFrame, wire.decode_response, b"\xff\xff\xff")


class FrameReaderTests(SynchronousTestCase):
    """
    L{wire.FrameReader} finds one frame in a stream split anywhere.
    """

    @given(
        payload=st.binary(max_size=300),
        rest=st.binary(max_size=50),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    )
    def test_anySplit(self, payload: bytes, rest: bytes, cuts: list[int]) -> None:
        """
        However the stream is split, the payload comes out whole, once, and the
        bytes after it are kept for the application.
        """
        stream = wire.frame(payload) + rest
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        reader = wire.FrameReader()
        results = []
        for start, end in zip(points, points[1:], strict=False):
            result = reader.feed(stream[start:end])
            if result is not None:
                results.append(result)
                # the rest of the stream is the application's
                results.append((b"", result[1] + stream[end:]))
                break
        self.assertEqual(results[0][0], payload)
        self.assertEqual(results[1][1], rest)

    def test_tooLarge(self) -> None:
        """
        A message over 65535 bytes is refused rather than silently truncated.
        """
        wire.frame(b"x" * wire.MAX_FRAME)
        self.assertRaises(wire.FrameTooLarge, wire.frame, b"x" * (wire.MAX_FRAME + 1))


class ProtoDriftTests(SynchronousTestCase):
    """
    The checked-in generated module matches C{proto/conn_header.proto}.
    """

    def test_descriptorMatchesProto(self) -> None:
        """
        Compiling the .proto gives the same descriptor as the generated module
        carries; a field renamed or renumbered on either side fails here.
        """
        try:
            import grpc_tools  # noqa: F401
        except ImportError:
            raise self.skipTest("grpcio-tools is not installed") from None
        proto_dir = _proto_dir()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "set.pb")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"-I{proto_dir}",
                    f"--descriptor_set_out={out}",
                    os.path.join(proto_dir, "conn_header.proto"),
                ],
                check=True,
            )
            compiled = descriptor_pb2.FileDescriptorSet()
            with open(out, "rb") as f:
                compiled.ParseFromString(f.read())
        expected = compiled.file[0]
        for message in [*expected.message_type, *_nested(expected.message_type)]:
            for each in message.field:
                each.ClearField("json_name")  # the Python generator leaves it out
        generated = descriptor_pb2.FileDescriptorProto()
        conn_header_pb2.DESCRIPTOR.CopyToProto(generated)
        self.assertEqual(expected, generated)


def _nested(messages):
    for message in messages:
        yield from message.nested_type
        yield from _nested(message.nested_type)
