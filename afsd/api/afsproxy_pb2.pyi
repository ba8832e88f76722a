from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("include_layerstores", "include_afslets")
    INCLUDE_LAYERSTORES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_AFSLETS_FIELD_NUMBER: _ClassVar[int]
    include_layerstores: bool
    include_afslets: bool
    def __init__(self, include_layerstores: bool = ..., include_afslets: bool = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("summary", "layerstore", "afslet", "error")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LAYERSTORE_FIELD_NUMBER: _ClassVar[int]
    AFSLET_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    summary: StatusSummary
    layerstore: LayerstoreInstance
    afslet: AfsletInstance
    error: StatusError
    def __init__(self, summary: _Optional[_Union[StatusSummary, _Mapping]] = ..., layerstore: _Optional[_Union[LayerstoreInstance, _Mapping]] = ..., afslet: _Optional[_Union[AfsletInstance, _Mapping]] = ..., error: _Optional[_Union[StatusError, _Mapping]] = ...) -> None: ...

class StatusSummary(_message.Message):
    __slots__ = ("layerstore_instances", "afslet_instances", "afslet_reachable", "total_layers")
    LAYERSTORE_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AFSLET_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AFSLET_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    layerstore_instances: int
    afslet_instances: int
    afslet_reachable: int
    total_layers: int
    def __init__(self, layerstore_instances: _Optional[int] = ..., afslet_instances: _Optional[int] = ..., afslet_reachable: _Optional[int] = ..., total_layers: _Optional[int] = ...) -> None: ...

class LayerstoreInstance(_message.Message):
    __slots__ = ("node_id", "endpoint", "last_seen_unix", "cache_max_bytes", "layers", "cached_images")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    last_seen_unix: int
    cache_max_bytes: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    cached_images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., last_seen_unix: _Optional[int] = ..., cache_max_bytes: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., cached_images: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("digest", "afs_size")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    afs_size: int
    def __init__(self, digest: _Optional[str] = ..., afs_size: _Optional[int] = ...) -> None: ...

class AfsletInstance(_message.Message):
    __slots__ = ("endpoint", "reachable", "error", "running_containers", "limit_cpu_cores", "limit_memory_mb", "used_cpu_cores", "used_memory_mb", "available_cpu_cores", "available_memory_mb")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    USED_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    reachable: bool
    error: str
    running_containers: int
    limit_cpu_cores: int
    limit_memory_mb: int
    used_cpu_cores: int
    used_memory_mb: int
    available_cpu_cores: int
    available_memory_mb: int
    def __init__(self, endpoint: _Optional[str] = ..., reachable: bool = ..., error: _Optional[str] = ..., running_containers: _Optional[int] = ..., limit_cpu_cores: _Optional[int] = ..., limit_memory_mb: _Optional[int] = ..., used_cpu_cores: _Optional[int] = ..., used_memory_mb: _Optional[int] = ..., available_cpu_cores: _Optional[int] = ..., available_memory_mb: _Optional[int] = ...) -> None: ...

class StatusError(_message.Message):
    __slots__ = ("source", "message")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    source: str
    message: str
    def __init__(self, source: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReconcileImageReplicaRequest(_message.Message):
    __slots__ = ("image", "tag", "platform_os", "platform_arch", "platform_variant", "replica")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    replica: int
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ..., replica: _Optional[int] = ...) -> None: ...

class ReconcileImageReplicaResponse(_message.Message):
    __slots__ = ("image_key", "current_replica", "requested_replica", "ensured", "layers")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REPLICA_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_REPLICA_FIELD_NUMBER: _ClassVar[int]
    ENSURED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    current_replica: int
    requested_replica: int
    ensured: bool
    layers: _containers.RepeatedCompositeFieldContainer[ReconciledLayerPlacement]
    def __init__(self, image_key: _Optional[str] = ..., current_replica: _Optional[int] = ..., requested_replica: _Optional[int] = ..., ensured: bool = ..., layers: _Optional[_Iterable[_Union[ReconciledLayerPlacement, _Mapping]]] = ...) -> None: ...

class ReconciledLayerPlacement(_message.Message):
    __slots__ = ("digest", "instances")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    instances: _containers.RepeatedCompositeFieldContainer[LayerstoreTarget]
    def __init__(self, digest: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[LayerstoreTarget, _Mapping]]] = ...) -> None: ...

class LayerstoreTarget(_message.Message):
    __slots__ = ("node_id", "endpoint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...
