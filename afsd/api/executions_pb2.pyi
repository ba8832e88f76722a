from afsd.api import afslet_pb2 as _afslet_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_PREPARING: _ClassVar[State]
    STATE_RUNNING: _ClassVar[State]
    STATE_STOPPING: _ClassVar[State]
    STATE_FINISHED: _ClassVar[State]
STATE_UNSPECIFIED: State
STATE_PREPARING: State
STATE_RUNNING: State
STATE_STOPPING: State
STATE_FINISHED: State

class ResourceUsage(_message.Message):
    __slots__ = ("cpu_seconds", "cpu_user_seconds", "cpu_system_seconds", "memory_current_bytes", "memory_peak_bytes", "oom_kills", "io_read_bytes", "io_write_bytes", "pids_current", "pids_peak", "wall_seconds")
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CURRENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PIDS_PEAK_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    memory_current_bytes: int
    memory_peak_bytes: int
    oom_kills: int
    io_read_bytes: int
    io_write_bytes: int
    pids_current: int
    pids_peak: int
    wall_seconds: float
    def __init__(self, cpu_seconds: _Optional[float] = ..., cpu_user_seconds: _Optional[float] = ..., cpu_system_seconds: _Optional[float] = ..., memory_current_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., oom_kills: _Optional[int] = ..., io_read_bytes: _Optional[int] = ..., io_write_bytes: _Optional[int] = ..., pids_current: _Optional[int] = ..., pids_peak: _Optional[int] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("id", "node_id", "endpoint", "image", "command", "cpu_cores", "memory_mb", "gpus", "timeout_ms", "created_unix_ms", "age_ms", "state", "usage", "success", "exit_code", "error", "outcome", "stop_stage", "stop_reason", "finished_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STOP_STAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    node_id: str
    endpoint: str
    image: str
    command: _containers.RepeatedScalarFieldContainer[str]
    cpu_cores: int
    memory_mb: int
    gpus: int
    timeout_ms: int
    created_unix_ms: int
    age_ms: int
    state: State
    usage: ResourceUsage
    success: bool
    exit_code: int
    error: str
    outcome: str
    stop_stage: _afslet_pb2.StopStage
    stop_reason: _afslet_pb2.StopReason
    finished_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., image: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., cpu_cores: _Optional[int] = ..., memory_mb: _Optional[int] = ..., gpus: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., age_ms: _Optional[int] = ..., state: _Optional[_Union[State, str]] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., success: bool = ..., exit_code: _Optional[int] = ..., error: _Optional[str] = ..., outcome: _Optional[str] = ..., stop_stage: _Optional[_Union[_afslet_pb2.StopStage, str]] = ..., stop_reason: _Optional[_Union[_afslet_pb2.StopReason, str]] = ..., finished_unix_ms: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("include_finished",)
    INCLUDE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    include_finished: bool
    def __init__(self, include_finished: bool = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("executions", "unreachable")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[Execution]
    unreachable: _containers.RepeatedCompositeFieldContainer[Unreachable]
    def __init__(self, executions: _Optional[_Iterable[_Union[Execution, _Mapping]]] = ..., unreachable: _Optional[_Iterable[_Union[Unreachable, _Mapping]]] = ...) -> None: ...

class Unreachable(_message.Message):
    __slots__ = ("endpoint", "error")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    error: str
    def __init__(self, endpoint: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("id", "tail", "follow", "endpoint")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tail: int
    follow: bool
    endpoint: str
    def __init__(self, id: _Optional[str] = ..., tail: _Optional[int] = ..., follow: bool = ..., endpoint: _Optional[str] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("source", "message", "unix_ms")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    source: str
    message: str
    unix_ms: int
    def __init__(self, source: _Optional[str] = ..., message: _Optional[str] = ..., unix_ms: _Optional[int] = ...) -> None: ...

class LogsResponse(_message.Message):
    __slots__ = ("lines", "dropped")
    LINES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    dropped: int
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("id", "endpoint")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    endpoint: str
    def __init__(self, id: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("execution", "already_finished")
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FINISHED_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    already_finished: bool
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ..., already_finished: bool = ...) -> None: ...
