# -*- test-case-name: ngrokd.test.test_wire -*-
"""
The binding ingress's connection header, without I/O.

Every connection to ngrok's binding ingress starts with one framed
C{ConnRequest} from the client and one framed C{ConnResponse} from the ingress;
a frame is a little-endian uint16 length followed by that many bytes of
protobuf (C{conn_header.proto}, beside this module). Every byte after the
response frame is application data. Both ngrokd and the devcloud speak it
through this module.
"""

from __future__ import annotations

import struct

from attrs import field, frozen
from google.protobuf.message import DecodeError

from ngrokd.datapath import conn_header_pb2 as pb

MAX_FRAME = 0xFFFF
_LENGTH = struct.Struct("<H")


class MalformedFrame(ValueError):
    """
    A frame's payload is not the protobuf message it should be.
    """


class FrameTooLarge(ValueError):
    """
    A message does not fit a uint16 length; ngrok's side would truncate it.
    """


@frozen
class PodIdentity:
    """
    Who is connecting, as ngrok's operator describes a Kubernetes pod; traffic
    policy may match on the annotations.
    """

    uid: str = ""
    name: str = ""
    namespace: str = ""
    annotations: dict[str, str] = field(factory=dict)


@frozen
class ConnRequest:
    """
    Which bound endpoint a connection is for: the endpoint URL's hostname (never
    with a port) and its port with scheme defaults filled in.
    """

    host: str
    port: int
    pod_identity: PodIdentity | None = PodIdentity()


@frozen
class ConnResponse:
    """
    The ingress's answer. A non-empty C{error_code} or C{error_message} is a
    refusal; C{notices} are warnings to log.
    """

    endpoint_id: str = ""
    proto: str = ""
    error_code: str = ""
    error_message: str = ""
    notices: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return bool(self.error_code or self.error_message)


def frame(payload: bytes) -> bytes:
    """
    Prefix C{payload} with its little-endian uint16 length.
    """
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(f"{len(payload)} bytes do not fit one frame")
    return _LENGTH.pack(len(payload)) + payload


def encode_request(request: ConnRequest) -> bytes:
    """
    The framed C{ConnRequest}, as ngrok's operator writes it: an empty pod
    identity is still sent (as C{1a 00}).
    """
    message = pb.ConnRequest(host=request.host, port=request.port)
    identity = request.pod_identity
    if identity is not None:
        message.pod_identity.SetInParent()
        message.pod_identity.uid = identity.uid
        message.pod_identity.name = identity.name
        message.pod_identity.namespace = identity.namespace
        message.pod_identity.annotations.update(identity.annotations)
    return frame(message.SerializeToString())


def decode_request(payload: bytes) -> ConnRequest:
    """
    Parse a C{ConnRequest} payload (the ingress side of the exchange).
    """
    message = pb.ConnRequest()
    _parse(message, payload, "ConnRequest")
    identity = None
    if message.HasField("pod_identity"):
        pid = message.pod_identity
        identity = PodIdentity(
            uid=pid.uid,
            name=pid.name,
            namespace=pid.namespace,
            annotations=dict(pid.annotations),
        )
    return ConnRequest(host=message.host, port=message.port, pod_identity=identity)


def encode_response(response: ConnResponse) -> bytes:
    """
    The framed C{ConnResponse} (the ingress side of the exchange).
    """
    message = pb.ConnResponse(
        endpoint_id=response.endpoint_id,
        proto=response.proto,
        error_code=response.error_code,
        error_message=response.error_message,
    )
    for notice in response.notices:
        message.notices.add(Message=notice)
    return frame(message.SerializeToString())


def decode_response(payload: bytes) -> ConnResponse:
    """
    Parse a C{ConnResponse} payload.
    """
    message = pb.ConnResponse()
    _parse(message, payload, "ConnResponse")
    return ConnResponse(
        endpoint_id=message.endpoint_id,
        proto=message.proto,
        error_code=message.error_code,
        error_message=message.error_message,
        notices=tuple(notice.Message for notice in message.notices),
    )


def _parse(
    message: pb.ConnRequest | pb.ConnResponse, payload: bytes, name: str
) -> None:
    try:
        message.ParseFromString(payload)
    except DecodeError as e:
        raise MalformedFrame(f"not a valid {name}: {e}") from None


class FrameReader:
    """
    Collects one frame from a byte stream that may arrive in any split.

    C{feed} returns C{None} until the frame is complete, then the payload and
    whatever bytes followed it in the stream, which belong to the application.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        self._buffer += data
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        payload, rest = self._buffer[_LENGTH.size : end], self._buffer[end:]
        self._buffer = b""
        return payload, rest
