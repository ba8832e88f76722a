from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImportLayerRequest(_message.Message):
    __slots__ = ("path", "stat")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    path: str
    stat: StatLayerResponse
    def __init__(self, path: _Optional[str] = ..., stat: _Optional[_Union[StatLayerResponse, _Mapping]] = ...) -> None: ...

class ImportLayerResponse(_message.Message):
    __slots__ = ("layer", "imported")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    layer: Layer
    imported: bool
    def __init__(self, layer: _Optional[_Union[Layer, _Mapping]] = ..., imported: bool = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("digest", "media_type", "compressed_size", "afs_size", "cache_path", "cached", "blob_digest", "diff_id")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_PATH_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    digest: str
    media_type: str
    compressed_size: int
    afs_size: int
    cache_path: str
    cached: bool
    blob_digest: str
    diff_id: str
    def __init__(self, digest: _Optional[str] = ..., media_type: _Optional[str] = ..., compressed_size: _Optional[int] = ..., afs_size: _Optional[int] = ..., cache_path: _Optional[str] = ..., cached: bool = ..., blob_digest: _Optional[str] = ..., diff_id: _Optional[str] = ...) -> None: ...

class PullImageRequest(_message.Message):
    __slots__ = ("image", "tag", "platform_os", "platform_arch", "platform_variant", "force_local_fetch")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    FORCE_LOCAL_FETCH_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    force_local_fetch: bool
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ..., force_local_fetch: bool = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("resolved_registry", "resolved_repository", "resolved_reference", "layers", "image_key", "manifest_digest")
    RESOLVED_REGISTRY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    resolved_registry: str
    resolved_repository: str
    resolved_reference: str
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    image_key: str
    manifest_digest: str
    def __init__(self, resolved_registry: _Optional[str] = ..., resolved_repository: _Optional[str] = ..., resolved_reference: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., image_key: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class EnsureLayersRequest(_message.Message):
    __slots__ = ("image", "tag", "platform_os", "platform_arch", "platform_variant", "layers", "delegated")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DELEGATED_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    delegated: bool
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., delegated: bool = ...) -> None: ...

class EnsureLayersResponse(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class StatLayerRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class StatLayerResponse(_message.Message):
    __slots__ = ("digest", "afs_size", "cache_path", "blob_digest", "data_map", "chunk_size", "chunk_digests", "converter", "blob_id", "diff_id", "media_type", "compressed_size", "implicit_dirs", "descriptor", "metadata_digest")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_MAP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    CONVERTER_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMPLICIT_DIRS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    afs_size: int
    cache_path: str
    blob_digest: str
    data_map: _containers.RepeatedCompositeFieldContainer[ByteRange]
    chunk_size: int
    chunk_digests: _containers.RepeatedScalarFieldContainer[bytes]
    converter: str
    blob_id: str
    diff_id: str
    media_type: str
    compressed_size: int
    implicit_dirs: _containers.RepeatedScalarFieldContainer[str]
    descriptor: SignedBlobDescriptor
    metadata_digest: str
    def __init__(self, digest: _Optional[str] = ..., afs_size: _Optional[int] = ..., cache_path: _Optional[str] = ..., blob_digest: _Optional[str] = ..., data_map: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., chunk_size: _Optional[int] = ..., chunk_digests: _Optional[_Iterable[bytes]] = ..., converter: _Optional[str] = ..., blob_id: _Optional[str] = ..., diff_id: _Optional[str] = ..., media_type: _Optional[str] = ..., compressed_size: _Optional[int] = ..., implicit_dirs: _Optional[_Iterable[str]] = ..., descriptor: _Optional[_Union[SignedBlobDescriptor, _Mapping]] = ..., metadata_digest: _Optional[str] = ...) -> None: ...

class SignedBlobDescriptor(_message.Message):
    __slots__ = ("payload", "signature", "certificate_chain")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signature: bytes
    certificate_chain: bytes
    def __init__(self, payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_chain: _Optional[bytes] = ...) -> None: ...

class ReadLayerRequest(_message.Message):
    __slots__ = ("digest", "offset", "length")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    length: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadLayerResponse(_message.Message):
    __slots__ = ("digest", "offset", "data", "eof")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    data: bytes
    eof: bool
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: bool = ...) -> None: ...

class OpenByteStreamRequest(_message.Message):
    __slots__ = ("digest", "streams")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    streams: int
    def __init__(self, digest: _Optional[str] = ..., streams: _Optional[int] = ...) -> None: ...

class OpenByteStreamResponse(_message.Message):
    __slots__ = ("host", "port", "tickets", "ticket_ttl_ms", "tls", "afs_size")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    tickets: _containers.RepeatedScalarFieldContainer[bytes]
    ticket_ttl_ms: int
    tls: bool
    afs_size: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., tickets: _Optional[_Iterable[bytes]] = ..., ticket_ttl_ms: _Optional[int] = ..., tls: bool = ..., afs_size: _Optional[int] = ...) -> None: ...

class HasLayerRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class HasLayerResponse(_message.Message):
    __slots__ = ("digest", "found", "afs_size")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    AFS_SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    found: bool
    afs_size: int
    def __init__(self, digest: _Optional[str] = ..., found: bool = ..., afs_size: _Optional[int] = ...) -> None: ...

class HasImageRequest(_message.Message):
    __slots__ = ("image", "tag", "platform_os", "platform_arch", "platform_variant")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_OS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_ARCH_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    image: str
    tag: str
    platform_os: str
    platform_arch: str
    platform_variant: str
    def __init__(self, image: _Optional[str] = ..., tag: _Optional[str] = ..., platform_os: _Optional[str] = ..., platform_arch: _Optional[str] = ..., platform_variant: _Optional[str] = ...) -> None: ...

class HasImageResponse(_message.Message):
    __slots__ = ("found", "resolved_registry", "resolved_repository", "resolved_reference", "total_layers", "missing_layers")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REGISTRY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MISSING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    resolved_registry: str
    resolved_repository: str
    resolved_reference: str
    total_layers: int
    missing_layers: int
    def __init__(self, found: bool = ..., resolved_registry: _Optional[str] = ..., resolved_repository: _Optional[str] = ..., resolved_reference: _Optional[str] = ..., total_layers: _Optional[int] = ..., missing_layers: _Optional[int] = ...) -> None: ...

class AcquireLayerLeaseRequest(_message.Message):
    __slots__ = ("digests", "ttl_ms")
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    ttl_ms: int
    def __init__(self, digests: _Optional[_Iterable[str]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class AcquireLayerLeaseResponse(_message.Message):
    __slots__ = ("lease_id", "digests", "expires_at_unix_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    expires_at_unix_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class RenewLayerLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "ttl_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class RenewLayerLeaseResponse(_message.Message):
    __slots__ = ("lease_id", "digests", "expires_at_unix_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    expires_at_unix_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class ReleaseLayerLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLayerLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class PruneCacheRequest(_message.Message):
    __slots__ = ("percent",)
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    percent: float
    def __init__(self, percent: _Optional[float] = ...) -> None: ...

class PruneCacheResponse(_message.Message):
    __slots__ = ("before_bytes", "after_bytes", "reclaimed_bytes", "evicted_layers")
    BEFORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AFTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    before_bytes: int
    after_bytes: int
    reclaimed_bytes: int
    evicted_layers: int
    def __init__(self, before_bytes: _Optional[int] = ..., after_bytes: _Optional[int] = ..., reclaimed_bytes: _Optional[int] = ..., evicted_layers: _Optional[int] = ...) -> None: ...

class ReadImageConfigRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class ReadImageConfigResponse(_message.Message):
    __slots__ = ("digest", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
