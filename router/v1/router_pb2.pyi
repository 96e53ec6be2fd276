from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStatusRequest(_message.Message):
    __slots__ = ("session_id", "probe")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    probe: bool
    def __init__(self, session_id: _Optional[str] = ..., probe: _Optional[bool] = ...) -> None: ...

class SessionStatusResponse(_message.Message):
    __slots__ = ("status", "pod", "source", "state", "unknown_pods", "detail", "also_on")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_PODS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ALSO_ON_FIELD_NUMBER: _ClassVar[int]
    status: str
    pod: str
    source: str
    state: str
    unknown_pods: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    also_on: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[str] = ..., pod: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[str] = ..., unknown_pods: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ..., also_on: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PodStatus(_message.Message):
    __slots__ = ("name", "address", "healthy", "draining", "feed_up", "open_sessions", "cached_sessions", "last_error", "feed_reconnects", "credentials_rejected", "not_placeable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    FEED_UP_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    FEED_RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    NOT_PLACEABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    healthy: bool
    draining: bool
    feed_up: bool
    open_sessions: int
    cached_sessions: int
    last_error: str
    feed_reconnects: int
    credentials_rejected: str
    not_placeable: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., draining: _Optional[bool] = ..., feed_up: _Optional[bool] = ..., open_sessions: _Optional[int] = ..., cached_sessions: _Optional[int] = ..., last_error: _Optional[str] = ..., feed_reconnects: _Optional[int] = ..., credentials_rejected: _Optional[str] = ..., not_placeable: _Optional[str] = ...) -> None: ...

class ListPodsResponse(_message.Message):
    __slots__ = ("pods", "store", "store_degraded", "version", "cached_sessions", "services")
    PODS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[PodStatus]
    store: str
    store_degraded: bool
    version: str
    cached_sessions: int
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, pods: _Optional[_Iterable[_Union[PodStatus, _Mapping]]] = ..., store: _Optional[str] = ..., store_degraded: _Optional[bool] = ..., version: _Optional[str] = ..., cached_sessions: _Optional[int] = ..., services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "up", "starts", "crashes", "last_error", "for_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    CRASHES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    up: bool
    starts: int
    crashes: int
    last_error: str
    for_seconds: float
    def __init__(self, name: _Optional[str] = ..., up: _Optional[bool] = ..., starts: _Optional[int] = ..., crashes: _Optional[int] = ..., last_error: _Optional[str] = ..., for_seconds: _Optional[float] = ...) -> None: ...

class DrainPodRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DrainPodResponse(_message.Message):
    __slots__ = ("pod",)
    POD_FIELD_NUMBER: _ClassVar[int]
    pod: PodStatus
    def __init__(self, pod: _Optional[_Union[PodStatus, _Mapping]] = ...) -> None: ...
