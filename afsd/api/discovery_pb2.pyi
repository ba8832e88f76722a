from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_VIEW_ASKED: _ClassVar[ServiceView]
    SERVICE_VIEW_ENDPOINTS: _ClassVar[ServiceView]
    SERVICE_VIEW_FULL: _ClassVar[ServiceView]
SERVICE_VIEW_ASKED: ServiceView
SERVICE_VIEW_ENDPOINTS: ServiceView
SERVICE_VIEW_FULL: ServiceView

class LayerStat(_message.Message):
    __slots__ = ("digest", "afs_size", "blob_digest")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    afs_size: int
    blob_digest: str
    def __init__(self, digest: _Optional[str] = ..., afs_size: _Optional[int] = ..., blob_digest: _Optional[str] = ...) -> None: ...

class ImageLayer(_message.Message):
    __slots__ = ("digest", "media_type", "compressed_size", "diff_id")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    digest: str
    media_type: str
    compressed_size: int
    diff_id: str
    def __init__(self, digest: _Optional[str] = ..., media_type: _Optional[str] = ..., compressed_size: _Optional[int] = ..., diff_id: _Optional[str] = ...) -> None: ...

class ServiceInstance(_message.Message):
    __slots__ = ("node_id", "endpoint", "last_seen_unix", "layer_digests", "cached_images", "layer_stats", "cache_max_bytes", "pulling_images", "pulling_layers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_STATS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULLING_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PULLING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    last_seen_unix: int
    layer_digests: _containers.RepeatedScalarFieldContainer[str]
    cached_images: _containers.RepeatedScalarFieldContainer[str]
    layer_stats: _containers.RepeatedCompositeFieldContainer[LayerStat]
    cache_max_bytes: int
    pulling_images: _containers.RepeatedScalarFieldContainer[str]
    pulling_layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., last_seen_unix: _Optional[int] = ..., layer_digests: _Optional[_Iterable[str]] = ..., cached_images: _Optional[_Iterable[str]] = ..., layer_stats: _Optional[_Iterable[_Union[LayerStat, _Mapping]]] = ..., cache_max_bytes: _Optional[int] = ..., pulling_images: _Optional[_Iterable[str]] = ..., pulling_layers: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "endpoint", "layer_digests", "cached_images", "layer_stats", "cache_max_bytes", "pulling_images", "pulling_layers", "leaving")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_STATS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULLING_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PULLING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    endpoint: str
    layer_digests: _containers.RepeatedScalarFieldContainer[str]
    cached_images: _containers.RepeatedScalarFieldContainer[str]
    layer_stats: _containers.RepeatedCompositeFieldContainer[LayerStat]
    cache_max_bytes: int
    pulling_images: _containers.RepeatedScalarFieldContainer[str]
    pulling_layers: _containers.RepeatedScalarFieldContainer[str]
    leaving: bool
    def __init__(self, node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., layer_digests: _Optional[_Iterable[str]] = ..., cached_images: _Optional[_Iterable[str]] = ..., layer_stats: _Optional[_Iterable[_Union[LayerStat, _Mapping]]] = ..., cache_max_bytes: _Optional[int] = ..., pulling_images: _Optional[_Iterable[str]] = ..., pulling_layers: _Optional[_Iterable[str]] = ..., leaving: bool = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("expires_in_seconds",)
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    expires_in_seconds: int
    def __init__(self, expires_in_seconds: _Optional[int] = ...) -> None: ...

class ImageRuntimeConfig(_message.Message):
    __slots__ = ("entrypoint", "cmd", "env", "working_dir", "user")
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    entrypoint: _containers.RepeatedScalarFieldContainer[str]
    cmd: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    working_dir: str
    user: str
    def __init__(self, entrypoint: _Optional[_Iterable[str]] = ..., cmd: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class ResolveImageRequest(_message.Message):
    __slots__ = ("image", "tag", "platform_os", "platform_arch", "platform_variant", "force_refresh")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    FORCE_REFRESH_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    force_refresh: bool
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ..., force_refresh: bool = ...) -> None: ...

class ResolveImageResponse(_message.Message):
    __slots__ = ("image_key", "resolved_registry", "resolved_repository", "resolved_reference", "layers", "runtime_config", "manifest_digest", "config_digest", "config")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REGISTRY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    resolved_registry: str
    resolved_repository: str
    resolved_reference: str
    layers: _containers.RepeatedCompositeFieldContainer[ImageLayer]
    runtime_config: ImageRuntimeConfig
    manifest_digest: str
    config_digest: str
    config: bytes
    def __init__(self, image_key: _Optional[str] = ..., resolved_registry: _Optional[str] = ..., resolved_repository: _Optional[str] = ..., resolved_reference: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[ImageLayer, _Mapping]]] = ..., runtime_config: _Optional[_Union[ImageRuntimeConfig, _Mapping]] = ..., manifest_digest: _Optional[str] = ..., config_digest: _Optional[str] = ..., config: _Optional[bytes] = ...) -> None: ...

class FindProviderRequest(_message.Message):
    __slots__ = ("layer_digest", "include_pulling", "max_services", "page_token", "view", "requester_endpoint")
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PULLING_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVICES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    layer_digest: str
    include_pulling: bool
    max_services: int
    page_token: str
    view: ServiceView
    requester_endpoint: str
    def __init__(self, layer_digest: _Optional[str] = ..., include_pulling: bool = ..., max_services: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[ServiceView, str]] = ..., requester_endpoint: _Optional[str] = ...) -> None: ...

class FindProviderResponse(_message.Message):
    __slots__ = ("layer_digest", "services", "next_page_token", "total_services")
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SERVICES_FIELD_NUMBER: _ClassVar[int]
    layer_digest: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstance]
    next_page_token: str
    total_services: int
    def __init__(self, layer_digest: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceInstance, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_services: _Optional[int] = ...) -> None: ...

class FindImageProviderRequest(_message.Message):
    __slots__ = ("image_key", "include_pulling", "max_services", "page_token", "view", "requester_endpoint")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PULLING_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVICES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    include_pulling: bool
    max_services: int
    page_token: str
    view: ServiceView
    requester_endpoint: str
    def __init__(self, image_key: _Optional[str] = ..., include_pulling: bool = ..., max_services: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[ServiceView, str]] = ..., requester_endpoint: _Optional[str] = ...) -> None: ...

class FindImageProviderResponse(_message.Message):
    __slots__ = ("image_key", "services", "next_page_token", "total_services")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SERVICES_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstance]
    next_page_token: str
    total_services: int
    def __init__(self, image_key: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceInstance, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_services: _Optional[int] = ...) -> None: ...

class FindImageRequest(_message.Message):
    __slots__ = ("image_key", "layer_digest", "max_services", "page_token", "view", "requester_endpoint")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVICES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    layer_digest: str
    max_services: int
    page_token: str
    view: ServiceView
    requester_endpoint: str
    def __init__(self, image_key: _Optional[str] = ..., layer_digest: _Optional[str] = ..., max_services: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[ServiceView, str]] = ..., requester_endpoint: _Optional[str] = ...) -> None: ...

class FindImageResponse(_message.Message):
    __slots__ = ("image_key", "services", "next_page_token", "total_services")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SERVICES_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstance]
    next_page_token: str
    total_services: int
    def __init__(self, image_key: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceInstance, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_services: _Optional[int] = ...) -> None: ...

class TraceRange(_message.Message):
    __slots__ = ("offset", "length", "first_read_ms")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FIRST_READ_MS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    first_read_ms: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., first_read_ms: _Optional[int] = ...) -> None: ...

class ReportAccessTraceRequest(_message.Message):
    __slots__ = ("node_id", "layer_digest", "blob_digest", "blob_size", "manifest_digest", "ranges", "window_seconds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    layer_digest: str
    blob_digest: str
    blob_size: int
    manifest_digest: str
    ranges: _containers.RepeatedCompositeFieldContainer[TraceRange]
    window_seconds: float
    def __init__(self, node_id: _Optional[str] = ..., layer_digest: _Optional[str] = ..., blob_digest: _Optional[str] = ..., blob_size: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[TraceRange, _Mapping]]] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class ReportAccessTraceResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: int
    def __init__(self, runs: _Optional[int] = ...) -> None: ...

class GetAccessTracesRequest(_message.Message):
    __slots__ = ("blob_digests", "manifest_digest")
    BLOB_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    blob_digests: _containers.RepeatedScalarFieldContainer[str]
    manifest_digest: str
    def __init__(self, blob_digests: _Optional[_Iterable[str]] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class AccessTrace(_message.Message):
    __slots__ = ("blob_digest", "blob_size", "ranges", "runs", "images", "same_image", "updated_unix")
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAME_IMAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    blob_digest: str
    blob_size: int
    ranges: _containers.RepeatedCompositeFieldContainer[TraceRange]
    runs: int
    images: int
    same_image: bool
    updated_unix: int
    def __init__(self, blob_digest: _Optional[str] = ..., blob_size: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[TraceRange, _Mapping]]] = ..., runs: _Optional[int] = ..., images: _Optional[int] = ..., same_image: bool = ..., updated_unix: _Optional[int] = ...) -> None: ...

class GetAccessTracesResponse(_message.Message):
    __slots__ = ("traces",)
    TRACES_FIELD_NUMBER: _ClassVar[int]
    traces: _containers.RepeatedCompositeFieldContainer[AccessTrace]
    def __init__(self, traces: _Optional[_Iterable[_Union[AccessTrace, _Mapping]]] = ...) -> None: ...
