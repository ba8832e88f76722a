from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MountRequest(_message.Message):
    __slots__ = ("image", "tag", "target", "backend", "platform", "upper_dir", "tmpfs_upper", "extra_dir", "tmpfs_upper_bytes", "volatile_upper")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    UPPER_DIR_FIELD_NUMBER: _ClassVar[int]
    TMPFS_UPPER_FIELD_NUMBER: _ClassVar[int]
    EXTRA_DIR_FIELD_NUMBER: _ClassVar[int]
    TMPFS_UPPER_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLATILE_UPPER_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    target: str
    backend: str
    platform: str
    upper_dir: str
    tmpfs_upper: bool
    extra_dir: str
    tmpfs_upper_bytes: int
    volatile_upper: bool
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., target: _Optional[str] = ..., backend: _Optional[str] = ..., platform: _Optional[str] = ..., upper_dir: _Optional[str] = ..., tmpfs_upper: bool = ..., extra_dir: _Optional[str] = ..., tmpfs_upper_bytes: _Optional[int] = ..., volatile_upper: bool = ...) -> None: ...

class LayerState(_message.Message):
    __slots__ = ("digest", "blob_digest", "size", "cached_bytes", "source", "learned_ranges", "learned_prefetched_bytes", "learned_used_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LEARNED_RANGES_FIELD_NUMBER: _ClassVar[int]
    LEARNED_PREFETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEARNED_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    blob_digest: str
    size: int
    cached_bytes: int
    source: str
    learned_ranges: int
    learned_prefetched_bytes: int
    learned_used_bytes: int
    def __init__(self, digest: _Optional[str] = ..., blob_digest: _Optional[str] = ..., size: _Optional[int] = ..., cached_bytes: _Optional[int] = ..., source: _Optional[str] = ..., learned_ranges: _Optional[int] = ..., learned_prefetched_bytes: _Optional[int] = ..., learned_used_bytes: _Optional[int] = ...) -> None: ...

class MountInfo(_message.Message):
    __slots__ = ("mount_id", "image", "image_key", "target", "backend", "created_unix", "layers", "bytes_cached", "bytes_total", "upper", "extra_dir", "manifest_digest")
    MOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_CACHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    EXTRA_DIR_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    mount_id: str
    image: str
    image_key: str
    target: str
    backend: str
    created_unix: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerState]
    bytes_cached: int
    bytes_total: int
    upper: str
    extra_dir: str
    manifest_digest: str
    def __init__(self, mount_id: _Optional[str] = ..., image: _Optional[str] = ..., image_key: _Optional[str] = ..., target: _Optional[str] = ..., backend: _Optional[str] = ..., created_unix: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerState, _Mapping]]] = ..., bytes_cached: _Optional[int] = ..., bytes_total: _Optional[int] = ..., upper: _Optional[str] = ..., extra_dir: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class MountResponse(_message.Message):
    __slots__ = ("mount", "seconds")
    MOUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    mount: MountInfo
    seconds: float
    def __init__(self, mount: _Optional[_Union[MountInfo, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class UnmountRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class UnmountResponse(_message.Message):
    __slots__ = ("mount",)
    MOUNT_FIELD_NUMBER: _ClassVar[int]
    mount: MountInfo
    def __init__(self, mount: _Optional[_Union[MountInfo, _Mapping]] = ...) -> None: ...

class ListMountsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMountsResponse(_message.Message):
    __slots__ = ("mounts", "backends", "counters")
    class BackendsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    mounts: _containers.RepeatedCompositeFieldContainer[MountInfo]
    backends: _containers.ScalarMap[str, str]
    counters: _containers.ScalarMap[str, float]
    def __init__(self, mounts: _Optional[_Iterable[_Union[MountInfo, _Mapping]]] = ..., backends: _Optional[_Mapping[str, str]] = ..., counters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AttachLayerRequest(_message.Message):
    __slots__ = ("lease_id", "image", "manifest_digest", "layer_digest", "backend", "platform")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    image: str
    manifest_digest: str
    layer_digest: str
    backend: str
    platform: str
    def __init__(self, lease_id: _Optional[str] = ..., image: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., layer_digest: _Optional[str] = ..., backend: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class LayerLease(_message.Message):
    __slots__ = ("lease_id", "layer_digest", "image", "manifest_digest", "mountpoint", "implicit_dirs", "backend", "size", "cached_bytes", "created_unix", "attached")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    IMPLICIT_DIRS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    layer_digest: str
    image: str
    manifest_digest: str
    mountpoint: str
    implicit_dirs: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    size: int
    cached_bytes: int
    created_unix: int
    attached: bool
    def __init__(self, lease_id: _Optional[str] = ..., layer_digest: _Optional[str] = ..., image: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., mountpoint: _Optional[str] = ..., implicit_dirs: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ..., size: _Optional[int] = ..., cached_bytes: _Optional[int] = ..., created_unix: _Optional[int] = ..., attached: bool = ...) -> None: ...

class AttachLayerResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: LayerLease
    def __init__(self, lease: _Optional[_Union[LayerLease, _Mapping]] = ...) -> None: ...

class ReleaseLayerRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLayerResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class ListLayerLeasesRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListLayerLeasesResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LayerLease]
    def __init__(self, leases: _Optional[_Iterable[_Union[LayerLease, _Mapping]]] = ...) -> None: ...
