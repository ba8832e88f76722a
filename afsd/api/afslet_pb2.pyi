from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_TYPE_DIR: _ClassVar[FileType]
    FILE_TYPE_FILE: _ClassVar[FileType]
    FILE_TYPE_SYMLINK: _ClassVar[FileType]

class StopStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_STAGE_NONE: _ClassVar[StopStage]
    STOP_STAGE_TERM: _ClassVar[StopStage]
    STOP_STAGE_INTERRUPT: _ClassVar[StopStage]
    STOP_STAGE_KILL: _ClassVar[StopStage]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_NONE: _ClassVar[StopReason]
    STOP_REASON_TIMEOUT: _ClassVar[StopReason]
    STOP_REASON_REQUEST: _ClassVar[StopReason]
    STOP_REASON_SHUTDOWN: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
FILE_TYPE_DIR: FileType
FILE_TYPE_FILE: FileType
FILE_TYPE_SYMLINK: FileType
STOP_STAGE_NONE: StopStage
STOP_STAGE_TERM: StopStage
STOP_STAGE_INTERRUPT: StopStage
STOP_STAGE_KILL: StopStage
STOP_REASON_NONE: StopReason
STOP_REASON_TIMEOUT: StopReason
STOP_REASON_REQUEST: StopReason
STOP_REASON_SHUTDOWN: StopReason
STOP_REASON_CANCELLED: StopReason

class ExecuteRequest(_message.Message):
    __slots__ = ("start", "file_begin", "file_chunk", "file_end")
    START_FIELD_NUMBER: _ClassVar[int]
    FILE_BEGIN_FIELD_NUMBER: _ClassVar[int]
    FILE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FILE_END_FIELD_NUMBER: _ClassVar[int]
    start: StartRequest
    file_begin: FileEntryBegin
    file_chunk: FileChunk
    file_end: FileEntryEnd
    def __init__(self, start: _Optional[_Union[StartRequest, _Mapping]] = ..., file_begin: _Optional[_Union[FileEntryBegin, _Mapping]] = ..., file_chunk: _Optional[_Union[FileChunk, _Mapping]] = ..., file_end: _Optional[_Union[FileEntryEnd, _Mapping]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("image", "tag", "command", "cpu_cores", "memory_mb", "timeout_ms", "discovery_addr", "force_local_fetch", "node_id", "platform_os", "platform_arch", "platform_variant", "proxy_dispatch_max_retries", "proxy_dispatch_backoff_ms", "env", "fuse_max_read_ahead_bytes", "gpus")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_ADDR_FIELD_NUMBER: _ClassVar[int]
    FORCE_LOCAL_FETCH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    PROXY_DISPATCH_MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PROXY_DISPATCH_BACKOFF_MS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FUSE_MAX_READ_AHEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    command: _containers.RepeatedScalarFieldContainer[str]
    cpu_cores: int
    memory_mb: int
    timeout_ms: int
    discovery_addr: str
    force_local_fetch: bool
    node_id: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    proxy_dispatch_max_retries: int
    proxy_dispatch_backoff_ms: int
    env: _containers.RepeatedScalarFieldContainer[str]
    fuse_max_read_ahead_bytes: int
    gpus: int
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., cpu_cores: _Optional[int] = ..., memory_mb: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., discovery_addr: _Optional[str] = ..., force_local_fetch: bool = ..., node_id: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ..., proxy_dispatch_max_retries: _Optional[int] = ..., proxy_dispatch_backoff_ms: _Optional[int] = ..., env: _Optional[_Iterable[str]] = ..., fuse_max_read_ahead_bytes: _Optional[int] = ..., gpus: _Optional[int] = ...) -> None: ...

class FileEntryBegin(_message.Message):
    __slots__ = ("path", "type", "mode", "uid", "gid", "mtime_unix", "symlink_target")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    MTIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    path: str
    type: FileType
    mode: int
    uid: int
    gid: int
    mtime_unix: int
    symlink_target: str
    def __init__(self, path: _Optional[str] = ..., type: _Optional[_Union[FileType, str]] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., mtime_unix: _Optional[int] = ..., symlink_target: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class FileEntryEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("log", "result", "tar_header", "tar_chunk", "done", "accepted")
    LOG_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TAR_HEADER_FIELD_NUMBER: _ClassVar[int]
    TAR_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    log: LogMessage
    result: Result
    tar_header: TarHeader
    tar_chunk: TarChunk
    done: Done
    accepted: Accepted
    def __init__(self, log: _Optional[_Union[LogMessage, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., tar_header: _Optional[_Union[TarHeader, _Mapping]] = ..., tar_chunk: _Optional[_Union[TarChunk, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("accepted", "execution_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    execution_id: str
    def __init__(self, accepted: bool = ..., execution_id: _Optional[str] = ...) -> None: ...

class LogMessage(_message.Message):
    __slots__ = ("source", "message")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    source: str
    message: str
    def __init__(self, source: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("success", "exit_code", "error", "execution_id", "stop_stage", "stop_reason")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_STAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    success: bool
    exit_code: int
    error: str
    execution_id: str
    stop_stage: StopStage
    stop_reason: StopReason
    def __init__(self, success: bool = ..., exit_code: _Optional[int] = ..., error: _Optional[str] = ..., execution_id: _Optional[str] = ..., stop_stage: _Optional[_Union[StopStage, str]] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ...) -> None: ...

class TarHeader(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TarChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRuntimeStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRuntimeStatusResponse(_message.Message):
    __slots__ = ("running_containers", "limit_cpu_cores", "limit_memory_mb", "used_cpu_cores", "used_memory_mb", "available_cpu_cores", "available_memory_mb", "limit_gpus", "used_gpus", "available_gpus", "draining")
    RUNNING_CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    USED_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    LIMIT_GPUS_FIELD_NUMBER: _ClassVar[int]
    USED_GPUS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_GPUS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    running_containers: int
    limit_cpu_cores: int
    limit_memory_mb: int
    used_cpu_cores: int
    used_memory_mb: int
    available_cpu_cores: int
    available_memory_mb: int
    limit_gpus: int
    used_gpus: int
    available_gpus: int
    draining: bool
    def __init__(self, running_containers: _Optional[int] = ..., limit_cpu_cores: _Optional[int] = ..., limit_memory_mb: _Optional[int] = ..., used_cpu_cores: _Optional[int] = ..., used_memory_mb: _Optional[int] = ..., available_cpu_cores: _Optional[int] = ..., available_memory_mb: _Optional[int] = ..., limit_gpus: _Optional[int] = ..., used_gpus: _Optional[int] = ..., available_gpus: _Optional[int] = ..., draining: bool = ...) -> None: ...
