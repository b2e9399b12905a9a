from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnRequest(_message.Message):
    __slots__ = ("host", "port", "pod_identity")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    POD_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    pod_identity: PodIdentity
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., pod_identity: _Optional[_Union[PodIdentity, _Mapping]] = ...) -> None: ...

class PodIdentity(_message.Message):
    __slots__ = ("uid", "name", "namespace", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    namespace: str
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConnResponse(_message.Message):
    __slots__ = ("endpoint_id", "proto", "error_code", "error_message", "notices")
    class Notice(_message.Message):
        __slots__ = ("Message",)
        MESSAGE_FIELD_NUMBER: _ClassVar[int]
        Message: str
        def __init__(self, Message: _Optional[str] = ...) -> None: ...
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTO_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    proto: str
    error_code: str
    error_message: str
    notices: _containers.RepeatedCompositeFieldContainer[ConnResponse.Notice]
    def __init__(self, endpoint_id: _Optional[str] = ..., proto: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., notices: _Optional[_Iterable[_Union[ConnResponse.Notice, _Mapping]]] = ...) -> None: ...
