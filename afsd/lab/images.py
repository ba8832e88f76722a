"""Container images for tests and demos, built by a path that shares no code with afsd's own.

Where it sits: upstream of everything else. Layers are described as Python data (`Entry`,
`LayerSpec`, `ImageSpec`), written as PAX tar archives with Python's `tarfile` (xattrs travel as
`SCHILY.xattr.*` records), compressed with gzip, zstd or not at all, and assembled into an OCI image
layout (`oci-layout`, `index.json`, `blobs/sha256/...`). `push_layout` sends a layout to a registry
with skopeo and checks that the registry now serves exactly the manifest that was written (skopeo is
told to preserve digests, so it cannot recompress a layer behind our back).

The second half is a catalogue of ready-made images: `features_image` (every tar feature a converter
must get right), `multiarch_images` (one image per platform, for an index) and `debian_layout`
(a real Debian root filesystem from debootstrap, cached under ~/.cache/afsd/images). Each comes with
`ImageFacts`: what must be true of the unpacked root filesystem, known from how it was built.

Nothing here imports pytest, afsd's registry client or afsd's converter: `afsd demo` uses this
module to seed a local registry, and the tests use it as the independent side of a comparison.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

import zstandard

from afsd.errors import AfsdError, MissingToolError
from afsd.oci import mediatypes
from afsd.oci.mediatypes import Compression
from afsd.oci.platform import Platform

# ---------------------------------------------------------------------------------------------
# Describing layers
# ---------------------------------------------------------------------------------------------

EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]
MediaTypes = Literal["oci", "docker"]

NS_PER_SECOND = 1_000_000_000
DEFAULT_MTIME_NS = 1_700_000_000 * NS_PER_SECOND  # 2023-11-14, a fixed time keeps layers reproducible
CREATED = "2024-01-01T00:00:00Z"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
              "fifo": tarfile.FIFOTYPE}


class ImageBuildError(AfsdError):
    """Building, caching or pushing a lab image failed."""


def _relative(path: str) -> str:
    """`path` relative to the image root: no leading or trailing slashes, `.` for the root."""
    return str(PurePosixPath("/", path).relative_to("/"))


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar.

    `path` is relative to the image root (`etc/passwd`; a leading `/` is ignored). `mode` holds the
    permission and special bits only (0o7777); the file type comes from `kind`. A regular file's
    content is `data`, or the file at `source` when the content is too big to hold in memory.
    `linkname` is a symlink's target, or for a hardlink the path of the earlier member it links to.
    `uname`/`gname` are written into the tar as they are: the numeric ids are what counts.
    """

    path: str
    kind: EntryKind = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    data: bytes = b""
    source: Path | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    @property
    def name(self) -> str:
        """The normalised relative path, without leading or trailing slashes."""
        return _relative(self.path)

    @property
    def size(self) -> int:
        if self.kind != "file":
            return 0
        return self.source.stat().st_size if self.source is not None else len(self.data)

    def sha256(self) -> str:
        """The hex sha256 of a regular file's content."""
        digest = hashlib.sha256()
        for chunk in _content_chunks(self):
            digest.update(chunk)
        return digest.hexdigest()

    # Constructors for the common kinds; every field can still be set by keyword.
    @classmethod
    def file(cls, path: str, data: bytes = b"", *, mode: int = 0o644, **kw: object) -> "Entry":
        return cls(path, "file", mode=mode, data=data, **kw)  # type: ignore[arg-type]

    @classmethod
    def dir(cls, path: str, *, mode: int = 0o755, **kw: object) -> "Entry":
        return cls(path, "dir", mode=mode, **kw)  # type: ignore[arg-type]

    @classmethod
    def symlink(cls, path: str, target: str, **kw: object) -> "Entry":
        return cls(path, "symlink", mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]

    @classmethod
    def hardlink(cls, path: str, target: str, **kw: object) -> "Entry":
        return cls(path, "hardlink", linkname=target, **kw)  # type: ignore[arg-type]

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, *, mode: int = 0o666,
                    **kw: object) -> "Entry":
        return cls(path, "char", mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    @classmethod
    def block_device(cls, path: str, major: int, minor: int, *, mode: int = 0o660,
                     **kw: object) -> "Entry":
        return cls(path, "block", mode=mode, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]

    @classmethod
    def fifo(cls, path: str, *, mode: int = 0o644, **kw: object) -> "Entry":
        return cls(path, "fifo", mode=mode, **kw)  # type: ignore[arg-type]

    @classmethod
    def whiteout(cls, path: str) -> "Entry":
        """Deletes `path` (file or whole directory) of the layers below."""
        p = PurePosixPath("/", path)
        return cls(str(p.parent / f"{WHITEOUT_PREFIX}{p.name}").lstrip("/"), "file", mode=0o000)

    @classmethod
    def opaque(cls, directory: str) -> "Entry":
        """Hides everything the layers below have inside `directory`."""
        return cls(str(PurePosixPath("/", directory) / OPAQUE_MARKER).lstrip("/"), "file", mode=0o000)


@dataclass(frozen=True)
class LayerSpec:
    """The members of one layer, in tar order, and how the layer blob is compressed.

    With `add_parents` (the default, as docker and BuildKit do) a directory entry is written for any
    parent directory the entries do not list themselves, with `Entry.dir` defaults, just before the
    first member inside it. Turn it off to produce layers with implicit parent directories.
    """

    entries: tuple[Entry, ...]
    compression: Compression = "gzip"
    add_parents: bool = True
    created_by: str = ""

    def members(self) -> list[Entry]:
        """The entries as they will be written to the tar.

        A hardlink member carries the metadata of the file it links to, as tar writers record it
        (extractors differ in whether they apply a link member's own mode and owner).
        """
        seen: set[str] = set()
        by_name: dict[str, Entry] = {}
        members: list[Entry] = []
        for entry in self.entries:
            if self.add_parents:
                parents = list(PurePosixPath(entry.name).parents)[:-1]  # drop "."
                for parent in reversed(parents):
                    if str(parent) not in seen:
                        seen.add(str(parent))
                        members.append(Entry.dir(str(parent)))
            if entry.kind == "dir":
                seen.add(entry.name)
            if entry.kind == "hardlink" and (target := by_name.get(_relative(entry.linkname))) is not None:
                entry = replace(entry, mode=target.mode, uid=target.uid, gid=target.gid,
                                mtime_ns=target.mtime_ns, uname=target.uname, gname=target.gname,
                                xattrs=target.xattrs)
            by_name[entry.name] = entry
            members.append(entry)
        return members


@dataclass(frozen=True)
class ImageSpec:
    """One single-platform image: its layers (bottom first), platform and runtime config."""

    layers: tuple[LayerSpec, ...]
    platform: Platform = Platform("linux", "amd64")
    cmd: tuple[str, ...] = ("/bin/sh",)
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    labels: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Writing layer blobs and an OCI image layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str
    compression: Compression


@dataclass(frozen=True)
class ManifestRecord:
    """A single-platform manifest written into a layout."""

    platform: Platform
    digest: str
    size: int
    media_type: str
    config_digest: str
    layers: tuple[LayerBlob, ...]


@dataclass(frozen=True)
class LayoutImage:
    """What `write_oci_layout` wrote under `tag`: a manifest, or an index of several."""

    layout_dir: Path
    tag: str
    digest: str  # of the manifest, or of the index
    media_type: str
    manifests: tuple[ManifestRecord, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEX_TYPES

    @property
    def oci_ref(self) -> str:
        """The skopeo/umoci name of this image: `<layout dir>:<tag>`."""
        return f"{self.layout_dir}:{self.tag}"

    def manifest_for(self, platform: Platform) -> ManifestRecord:
        for record in self.manifests:
            if record.platform == platform:
                return record
        raise KeyError(f"no manifest for {platform} in {self.oci_ref}")


_OCI_LAYER_TYPES: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_CHUNK = 1 << 20
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target: BinaryIO) -> None:
        super().__init__()
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._target.write(view)
        return view.nbytes

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


def _content_chunks(entry: Entry) -> Iterator[bytes]:
    if entry.source is None:
        for offset in range(0, len(entry.data), _CHUNK):
            yield entry.data[offset:offset + _CHUNK]
        return
    with open(entry.source, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = _TAR_TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    seconds, nanoseconds = divmod(entry.mtime_ns, NS_PER_SECOND)
    info.mtime = seconds
    # A hardlink names an earlier member by its archive path, which has no leading slash.
    info.linkname = _relative(entry.linkname) if entry.kind == "hardlink" else entry.linkname
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = entry.size
    pax: dict[str, str] = {}
    if nanoseconds:
        # tarfile would format a float with too few digits; an explicit record keeps every ns.
        pax["mtime"] = f"{seconds}.{nanoseconds:09d}"
    for name, value in entry.xattrs.items():
        # tarfile encodes a value that is not valid UTF-8 back to its raw bytes (hdrcharset=BINARY).
        pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def write_layer_tar(members: Iterable[Entry], out: BinaryIO) -> None:
    """Write `members` as a PAX tar archive to `out` (an uncompressed stream)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in members:
            info = _tarinfo(entry)
            if entry.kind == "file":
                archive.addfile(info, io.BufferedReader(_ChunkReader(_content_chunks(entry)), _CHUNK))
            else:
                archive.addfile(info)


def _store_blob(blobs_dir: Path, data: bytes) -> tuple[str, int]:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = blobs_dir / digest.split(":", 1)[1]
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
    return digest, len(data)


def write_layer_blob(blobs_dir: Path, layer: LayerSpec) -> LayerBlob:
    """Write one layer into `blobs_dir` (a layout's `blobs/sha256`), compressed as the spec says."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            blob = _HashingWriter(raw)
            if layer.compression == "gzip":
                # mtime=0 and no file name: the same entries always give the same blob digest.
                compressor: BinaryIO = gzip.GzipFile(filename="", fileobj=blob, mode="wb",  # type: ignore[assignment]
                                                     compresslevel=GZIP_LEVEL, mtime=0)
            elif layer.compression == "zstd":
                compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(  # type: ignore[assignment]
                    blob, closefd=False)
            else:
                compressor = blob  # type: ignore[assignment]
            tar = _HashingWriter(compressor)
            write_layer_tar(layer.members(), tar)  # type: ignore[arg-type]
            if compressor is not blob:
                compressor.close()
        final = blobs_dir / blob.digest.split(":", 1)[1]
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return LayerBlob(digest=blob.digest, diff_id=tar.digest, size=blob.size,
                     media_type=_OCI_LAYER_TYPES[layer.compression],
                     compression=layer.compression)


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, indent=2, sort_keys=False).encode() + b"\n"


def _platform_json(platform: Platform) -> dict[str, str]:
    doc = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def _write_image(blobs_dir: Path, spec: ImageSpec) -> ManifestRecord:
    layers = tuple(write_layer_blob(blobs_dir, layer) for layer in spec.layers)
    config = {
        "created": CREATED,
        **_platform_json(spec.platform),
        "config": {"Env": list(spec.env), "Cmd": list(spec.cmd), "Labels": dict(spec.labels)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": layer.created_by or f"afsd lab layer {i}"}
                    for i, layer in enumerate(spec.layers)],
    }
    config_digest, config_size = _store_blob(blobs_dir, _json_bytes(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }
    digest, size = _store_blob(blobs_dir, _json_bytes(manifest))
    return ManifestRecord(spec.platform, digest, size, mediatypes.OCI_MANIFEST, config_digest,
                          layers)


def write_oci_layout(layout_dir: Path, tag: str, images: ImageSpec | Sequence[ImageSpec]) -> LayoutImage:
    """Write an image (or, given a sequence, an index of images) into an OCI layout under `tag`.

    The layout is created if needed; other tags already in it are kept, so several images can share
    one layout and its blobs. A layout always holds OCI media types (skopeo ignores index.json
    entries of other types); `push_layout` converts to Docker schema 2 on the way to a registry.
    """
    layout_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    blobs_dir = layout_dir / "blobs" / "sha256"
    specs = [images] if isinstance(images, ImageSpec) else list(images)
    if not specs:
        raise ValueError("write_oci_layout needs at least one image")
    records = tuple(_write_image(blobs_dir, spec) for spec in specs)
    if isinstance(images, ImageSpec):
        top_digest, top_size, top_type = records[0].digest, records[0].size, records[0].media_type
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [{"mediaType": r.media_type, "digest": r.digest, "size": r.size,
                           "platform": _platform_json(r.platform)} for r in records],
        }
        top_digest, top_size = _store_blob(blobs_dir, _json_bytes(index))
        top_type = mediatypes.OCI_INDEX

    index_path = layout_dir / "index.json"
    layout_index = (json.loads(index_path.read_text()) if index_path.exists()
                    else {"schemaVersion": 2, "manifests": []})
    layout_index["manifests"] = [d for d in layout_index["manifests"]
                                 if d.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag]
    layout_index["manifests"].append({"mediaType": top_type, "digest": top_digest, "size": top_size,
                                      "annotations": {REF_NAME_ANNOTATION: tag}})
    partial = index_path.with_name("index.json.partial")
    partial.write_bytes(_json_bytes(layout_index))
    os.replace(partial, index_path)
    return LayoutImage(layout_dir, tag, top_digest, top_type, records)


# ---------------------------------------------------------------------------------------------
# Pushing and pulling with skopeo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    """An image in a registry: where it is, what the registry serves, and what must be true of it.

    `digest`, `media_type` and `manifests` describe what the registry serves (for a Docker-typed
    push they differ from the OCI `layout` it came from; the layer blobs never do). `facts` holds,
    per platform, what the unpacked root filesystem must contain.
    """

    registry: str  # host:port
    repository: str
    tag: str
    digest: str
    media_type: str
    manifests: tuple[ManifestRecord, ...]
    layout: LayoutImage
    facts: Mapping[Platform, ImageFacts] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """`host:port/repository:tag`, ready for `parse_reference`."""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def platforms(self) -> tuple[Platform, ...]:
        return tuple(record.platform for record in self.manifests)

    def manifest_for(self, platform: Platform) -> ManifestRecord:
        for record in self.manifests:
            if record.platform == platform:
                return record
        raise KeyError(f"{self.reference} has no manifest for {platform}")

    def pinned_reference(self, platform: Platform) -> str:
        """`host:port/repository@sha256:...` of one platform's manifest."""
        return f"{self.registry}/{self.repository}@{self.manifest_for(platform).digest}"


def _skopeo() -> str:
    binary = shutil.which("skopeo")
    if binary is None:
        raise MissingToolError("skopeo is not installed; run scripts/setup.sh (Debian package skopeo)")
    return binary


def _run(argv: list[str], what: str) -> bytes:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise ImageBuildError(f"{what} failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
    return result.stdout


def _served_manifest(reference: str, creds: str | None) -> bytes:
    argv = [_skopeo(), "inspect", "--raw", "--tls-verify=false"]
    if creds:
        argv += ["--creds", creds]
    return _run(argv + [f"docker://{reference}"], f"skopeo inspect of {reference}")


def _digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def push_layout(layout: LayoutImage, registry: str, repository: str, tag: str | None = None, *,
                media_types: MediaTypes = "oci", creds: str | None = None,
                facts: Mapping[Platform, ImageFacts] | None = None) -> PushedImage:
    """Push `layout` to `registry` (`host:port`, plain HTTP) as `repository:tag` with skopeo.

    With OCI media types skopeo runs with `--preserve-digests` and the registry must then serve the
    manifest (or index, pushed with all its manifests) byte for byte as written. With Docker media
    types (`--format v2s2`, single images with gzip layers only) skopeo rewrites the manifest, so
    the check is that every layer blob kept its digest: layers are never recompressed either way.
    `creds` is `user:password` for registries with htpasswd auth.
    """
    tag = tag or layout.tag
    target = f"{registry}/{repository}:{tag}"
    argv = [_skopeo(), "copy", "--quiet", "--dest-tls-verify=false"]
    if media_types == "docker":
        if layout.is_index:
            raise ValueError("push_layout: Docker media types are supported for single images only")
        if any(layer.compression != "gzip" for layer in layout.manifests[0].layers):
            raise ValueError("push_layout: Docker schema 2 images here carry gzip layers only")
        argv += ["--format", "v2s2"]
    else:
        argv.append("--preserve-digests")
    if layout.is_index:
        argv.append("--all")
    if creds:
        argv += ["--dest-creds", creds]
    _run(argv + [f"oci:{layout.oci_ref}", f"docker://{target}"],
         f"skopeo push of {layout.oci_ref} to {target}")

    raw = _served_manifest(target, creds)
    served = _digest_of(raw)
    if media_types == "oci":
        if served != layout.digest:
            raise ImageBuildError(f"registry {registry} serves {repository}:{tag} as {served}, not the "
                                  f"{layout.digest} that was pushed (skopeo rewrote the manifest)")
        manifests = layout.manifests
    else:
        manifests = (_docker_record(layout.manifests[0], raw, target),)
    return PushedImage(registry, repository, tag, served, json.loads(raw)["mediaType"], manifests,
                       layout, dict(facts or {}))


def _docker_record(source: ManifestRecord, raw: bytes, target: str) -> ManifestRecord:
    manifest = json.loads(raw)
    if manifest.get("mediaType") != mediatypes.DOCKER_MANIFEST:
        raise ImageBuildError(f"{target}: skopeo pushed {manifest.get('mediaType')}, not a Docker manifest")
    served_layers = [(layer["digest"], layer["mediaType"]) for layer in manifest["layers"]]
    if [digest for digest, _ in served_layers] != [layer.digest for layer in source.layers]:
        raise ImageBuildError(f"{target}: skopeo changed the layer blobs while converting to Docker schema 2")
    layers = tuple(replace(layer, media_type=media_type)
                   for layer, (_, media_type) in zip(source.layers, served_layers))
    return ManifestRecord(source.platform, _digest_of(raw), len(raw), mediatypes.DOCKER_MANIFEST,
                          manifest["config"]["digest"], layers)


def _layout_manifest(layout_dir: Path, tag: str) -> dict:
    index = json.loads((layout_dir / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            blob = layout_dir / "blobs" / "sha256" / descriptor["digest"].split(":", 1)[1]
            return json.loads(blob.read_bytes())
    raise ImageBuildError(f"OCI layout {layout_dir} has no image tagged {tag!r}")


def pull_to_layout(reference: str, layout_dir: Path, tag: str, *, creds: str | None = None) -> None:
    """Copy one image manifest from a registry into an OCI layout with skopeo, layers unchanged.

    `reference` is `host:port/repo:tag`, or `host:port/repo@sha256:...` to pick one platform of an
    index. A Docker manifest is converted to OCI (the layout format requires it) but the layer blobs
    are kept as served, uncompressed ones included (skopeo would otherwise gzip them for an `oci:`
    destination); this is checked against the manifest the registry serves.
    """
    argv = [_skopeo(), "copy", "--quiet", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]
    if creds:
        argv += ["--src-creds", creds]
    _run(argv + [f"docker://{reference}", f"oci:{layout_dir}:{tag}"],
         f"skopeo pull of {reference} into {layout_dir}")
    served = json.loads(_served_manifest(reference, creds))
    if "layers" not in served:
        raise ImageBuildError(f"pull_to_layout: {reference} is an index; pin one platform's manifest digest")
    pulled = _layout_manifest(layout_dir, tag)
    if [layer["digest"] for layer in pulled["layers"]] != [layer["digest"] for layer in served["layers"]]:
        raise ImageBuildError(f"skopeo changed the layer blobs of {reference} while copying it to {layout_dir}")


def read_layout(layout_dir: Path, tag: str) -> LayoutImage:
    """Describe an image (manifest or index) already written into an OCI layout under `tag`."""
    blobs_dir = layout_dir / "blobs" / "sha256"

    def blob(digest: str) -> bytes:
        return (blobs_dir / digest.split(":", 1)[1]).read_bytes()

    def record(descriptor: dict, platform: Platform | None) -> ManifestRecord:
        manifest = json.loads(blob(descriptor["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        if platform is None:
            platform = Platform(config.get("os", ""), config.get("architecture", ""), config.get("variant", ""))
        layers = tuple(LayerBlob(layer["digest"], diff_id, layer["size"], layer["mediaType"],
                                 mediatypes.layer_compression(layer["mediaType"]))
                       for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]))
        return ManifestRecord(platform, descriptor["digest"], descriptor["size"], manifest["mediaType"],
                              manifest["config"]["digest"], layers)

    index = json.loads((layout_dir / "index.json").read_text())
    for top in index["manifests"]:
        if top.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag:
            continue
        if top["mediaType"] in mediatypes.INDEX_TYPES:
            entries = json.loads(blob(top["digest"]))["manifests"]
            records = tuple(record(d, Platform(d["platform"]["os"], d["platform"]["architecture"],
                                               d["platform"].get("variant", ""))) for d in entries)
        else:
            records = (record(top, None),)
        return LayoutImage(layout_dir, tag, top["digest"], top["mediaType"], records)
    raise ImageBuildError(f"OCI layout {layout_dir} has no image tagged {tag!r}")


# ---------------------------------------------------------------------------------------------
# What an image's root filesystem must look like
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """Paths whose final state is known from how the image was built (keys are `/abs/paths`).

    `kinds` maps each known path to file/dir/symlink/char/block/fifo; the other maps hold what is
    known about those paths (content sha256, symlink target, permission bits, owner, xattrs, device
    numbers, mtime in ns for non-directories). `absent` paths must not exist (deleted by whiteouts
    or opaque directories); each of `hardlink_groups` must be one inode.
    """

    kinds: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    symlinks: Mapping[str, str] = field(default_factory=dict)
    modes: Mapping[str, int] = field(default_factory=dict)
    owners: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    xattrs: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    devices: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    mtimes_ns: Mapping[str, int] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    hardlink_groups: tuple[frozenset[str], ...] = ()

    def only(self, paths: Iterable[str]) -> "ImageFacts":
        """The facts about `paths` alone (plus all absent paths and hardlink groups among them)."""
        keep = set(paths)

        def pick(mapping: Mapping[str, object]) -> dict:
            return {p: v for p, v in mapping.items() if p in keep}

        return ImageFacts(pick(self.kinds), pick(self.files), pick(self.symlinks), pick(self.modes),
                          pick(self.owners), pick(self.xattrs), pick(self.devices), pick(self.mtimes_ns),
                          self.absent, tuple(g for g in self.hardlink_groups if g <= keep))

    def check(self, root: Path) -> list[str]:
        """What in the root filesystem at `root` contradicts these facts (empty when nothing)."""
        problems: list[str] = []

        def at(path: str) -> Path:
            return root / path.lstrip("/")

        for path in sorted(self.absent):
            if os.path.lexists(at(path)):
                problems.append(f"{path}: exists, but a whiteout deleted it")
        for path, kind in sorted(self.kinds.items()):
            try:
                st = os.lstat(at(path))
            except FileNotFoundError:
                problems.append(f"{path}: missing (expected {kind})")
                continue
            actual = file_kind(st.st_mode)
            if actual != kind:
                problems.append(f"{path}: is a {actual}, expected {kind}")
                continue
            if path in self.modes and stat.S_IMODE(st.st_mode) != self.modes[path]:
                problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, expected {self.modes[path]:04o}")
            if path in self.owners and (st.st_uid, st.st_gid) != tuple(self.owners[path]):
                problems.append(f"{path}: owner {st.st_uid}:{st.st_gid}, expected "
                                f"{self.owners[path][0]}:{self.owners[path][1]}")
            if path in self.mtimes_ns and st.st_mtime_ns != self.mtimes_ns[path]:
                problems.append(f"{path}: mtime {st.st_mtime_ns} ns, expected {self.mtimes_ns[path]} ns")
            if path in self.files and _file_sha256(at(path)) != self.files[path]:
                problems.append(f"{path}: content differs from what the image holds")
            if path in self.symlinks and os.readlink(at(path)) != self.symlinks[path]:
                problems.append(f"{path}: symlink to {os.readlink(at(path))!r}, expected {self.symlinks[path]!r}")
            if path in self.devices and (os.major(st.st_rdev), os.minor(st.st_rdev)) != tuple(self.devices[path]):
                problems.append(f"{path}: device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, expected "
                                f"{self.devices[path][0]}:{self.devices[path][1]}")
            if path in self.xattrs:
                actual_xattrs = _read_xattrs(at(path))
                if actual_xattrs != dict(self.xattrs[path]):
                    problems.append(f"{path}: xattrs {sorted(actual_xattrs)} differ from expected "
                                    f"{sorted(self.xattrs[path])}")
        for group in self.hardlink_groups:
            inodes = {(s.st_dev, s.st_ino) for s in (os.lstat(at(p)) for p in group if os.path.lexists(at(p)))}
            if len(inodes) != 1:
                problems.append(f"{sorted(group)}: expected one inode (hardlinks), found {len(inodes)}")
        return problems

    def to_json(self) -> dict:
        return {
            "kinds": dict(self.kinds), "files": dict(self.files), "symlinks": dict(self.symlinks),
            "modes": dict(self.modes), "owners": {p: list(o) for p, o in self.owners.items()},
            "xattrs": {p: {k: v.hex() for k, v in x.items()} for p, x in self.xattrs.items()},
            "devices": {p: list(d) for p, d in self.devices.items()}, "mtimes_ns": dict(self.mtimes_ns),
            "absent": sorted(self.absent), "hardlink_groups": [sorted(g) for g in self.hardlink_groups],
        }

    @classmethod
    def from_json(cls, doc: Mapping) -> "ImageFacts":
        return cls(doc["kinds"], doc["files"], doc["symlinks"], doc["modes"],
                   {p: (o[0], o[1]) for p, o in doc["owners"].items()},
                   {p: {k: bytes.fromhex(v) for k, v in x.items()} for p, x in doc["xattrs"].items()},
                   {p: (d[0], d[1]) for p, d in doc["devices"].items()}, doc["mtimes_ns"],
                   frozenset(doc["absent"]), tuple(frozenset(g) for g in doc["hardlink_groups"]))


def file_kind(mode: int) -> str:
    """file, dir, symlink, char, block, fifo or socket, from an `st_mode`."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "unknown"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    # Overlayfs keeps its own bookkeeping there; it is not image content.
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names if not n.startswith("trusted.overlay.")}


def apply_layers(layers: Sequence[LayerSpec]) -> tuple[dict[str, Entry], tuple[frozenset[str], ...]]:
    """The final state of an image's root filesystem by the OCI layer rules, as a third opinion.

    Returns each surviving path (`/abs/path`) with the entry that determines it (a hardlink is
    replaced by the entry of the file it links to, which shares its inode) and the hardlink groups
    with more than one surviving path. Whiteouts and opaque markers apply to lower layers only; a
    non-directory replacing a directory drops the directory's contents.
    """
    state: dict[str, Entry] = {}
    inode_of: dict[str, str] = {}  # path -> path of the first member of its inode

    def drop(path: str, *, itself: bool, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        prefix = path.rstrip("/") + "/"
        for p in [p for p in state if (p.startswith(prefix) or (itself and p == path)) and p not in keep]:
            del state[p]
            inode_of.pop(p, None)

    for layer in layers:
        this_layer: set[str] = set()
        for entry in layer.members():
            path = "/" + entry.name
            parent, base = path.rsplit("/", 1)
            parent = parent or "/"
            if base == OPAQUE_MARKER:
                drop(parent, itself=False, keep=this_layer)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                drop(f"{parent.rstrip('/')}/{base[len(WHITEOUT_PREFIX):]}", itself=True, keep=this_layer)
                continue
            previous = state.get(path)
            if previous is not None and not (previous.kind == "dir" and entry.kind == "dir"):
                drop(path, itself=True)
            if entry.kind == "hardlink":
                target = "/" + _relative(entry.linkname)
                state[path] = replace(state[target], path=entry.path)
                inode_of[path] = inode_of.get(target, target)
            else:
                state[path] = entry
                inode_of[path] = path
            this_layer.add(path)

    groups: dict[str, set[str]] = {}
    for path, first in inode_of.items():
        if path in state and state[path].kind == "file":
            groups.setdefault(first, set()).add(path)
    return state, tuple(frozenset(g) for g in groups.values() if len(g) > 1)


def facts_from_layers(layers: Sequence[LayerSpec], *, paths: Iterable[str] | None = None,
                      absent: Iterable[str] = ()) -> ImageFacts:
    """`ImageFacts` for the root filesystem `layers` build (for `paths` only, if given)."""
    state, groups = apply_layers(layers)
    wanted = set(state) if paths is None else set(paths)
    absent = frozenset(absent)
    if wanted - set(state) or absent & set(state):
        raise ValueError(f"facts_from_layers: paths not in the image: {sorted(wanted - set(state))}; "
                         f"paths meant to be deleted but present: {sorted(absent & set(state))}")
    chosen = {p: e for p, e in state.items() if p in wanted}
    return ImageFacts(
        kinds={p: e.kind for p, e in chosen.items()},
        files={p: e.sha256() for p, e in chosen.items() if e.kind == "file"},
        symlinks={p: e.linkname for p, e in chosen.items() if e.kind == "symlink"},
        modes={p: e.mode & 0o7777 for p, e in chosen.items() if e.kind != "symlink"},
        owners={p: (e.uid, e.gid) for p, e in chosen.items()},
        xattrs={p: dict(e.xattrs) for p, e in chosen.items() if e.kind in ("file", "dir")},
        devices={p: (e.devmajor, e.devminor) for p, e in chosen.items() if e.kind in ("char", "block")},
        mtimes_ns={p: e.mtime_ns for p, e in chosen.items() if e.kind != "dir"},
        absent=absent,
        hardlink_groups=tuple(g for g in groups if g <= wanted),
    )


# ---------------------------------------------------------------------------------------------
# The catalogue: test images
# ---------------------------------------------------------------------------------------------

LARGE_FILE_SIZE = 48 << 20
LARGE_FILE_PATH = "/large/random.bin"
# security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_bind_service (bit 10).
NET_BIND_CAPABILITY = struct.pack("<IIIII", 0x0200_0001, 1 << 10, 0, 0, 0)
DEEP_DIR = "deep/" + "/".join(f"level-{i:02d}" for i in range(40))
LONG_NAME = "names/" + "long-" + "x" * 230 + ".txt"


def seeded_bytes(seed: str, size: int) -> bytes:
    """`size` pseudo-random bytes, always the same for the same seed (incompressible test data)."""
    return hashlib.shake_256(seed.encode()).digest(size)


def _seconds(value: float | int) -> int:
    return int(value) * NS_PER_SECOND


def features_layers(compressions: Sequence[Compression] = ("gzip", "zstd", "none"), *,
                    large_file_size: int = LARGE_FILE_SIZE) -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Three layers that exercise what a layer converter must get right, and the facts they imply.

    Layer 1 lays out files, directories, links, devices, special bits, xattrs, odd owners, times and
    names; layer 2 deletes (whiteouts of files and directories, an opaque directory, one member of a
    hardlink group), replaces paths by other types and changes metadata only; layer 3 holds one large
    file and re-creates paths that layer 2 deleted. `compressions` gives each layer's compression.
    """
    if len(compressions) != 3:
        raise ValueError("features_layers needs one compression per layer (3)")
    hello = b"hello, world\n"
    odd = {"uid": 1234, "gid": 5678}
    base = (
        Entry.dir("etc"),
        Entry.file("etc/hostname", b"features\n"),
        Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nodd:x:1234:5678::/:/bin/false\n"),
        Entry.dir("data"),
        Entry.file("data/hello.txt", hello),
        Entry.file("data/empty"),
        Entry.dir("data/empty-dir", mode=0o700),
        Entry.file("data/block-4096", seeded_bytes("4096", 4096)),
        Entry.file("data/block-4097", seeded_bytes("4097", 4097)),
        Entry.file("data/zeros-1m", bytes(1 << 20)),
        Entry.file("data/to-delete.txt", b"deleted in layer 2\n"),
        Entry.dir("data/dir-to-delete"),
        Entry.file("data/dir-to-delete/a", b"a\n"),
        Entry.file("data/dir-to-delete/sub/b", b"b\n"),
        Entry.dir("data/opaque", mode=0o755),
        Entry.file("data/opaque/old-1", b"hidden by the opaque marker\n"),
        Entry.file("data/opaque/old-sub/old-2", b"hidden too\n"),
        Entry.dir("data/dir-becomes-file"),
        Entry.file("data/dir-becomes-file/inside", b"gone with its directory\n"),
        Entry.file("data/file-becomes-dir", b"replaced by a directory\n"),
        Entry.file("data/file-becomes-symlink", b"replaced by a symlink\n"),
        Entry.file("data/chmod-only", b"same content, new metadata\n", mode=0o644),
        Entry.dir("data/merged"),
        Entry.file("data/merged/lower.txt", b"from layer 1\n"),
        Entry.file("data/reborn.txt", b"first life\n"),
        # Hardlinks: a group of three, a group that loses a member in layer 2, a setuid pair.
        Entry.file("links/hard-a", b"one inode, three names\n", mode=0o640, **odd),
        Entry.hardlink("links/hard-b", "links/hard-a"),
        Entry.hardlink("links/sub/hard-c", "links/hard-a"),
        Entry.file("links/pair-a", b"a group that shrinks\n"),
        Entry.hardlink("links/pair-b", "links/pair-a"),
        Entry.hardlink("links/pair-c", "links/pair-a"),
        Entry.symlink("links/relative", "../data/hello.txt"),
        Entry.symlink("links/absolute", "/data/hello.txt"),
        Entry.symlink("links/dangling", "/does/not/exist"),
        Entry.symlink("links/to-dir", "../data"),
        Entry.symlink("links/to-dir-absolute", "/data/merged"),
        Entry.symlink("links/loop", "loop"),
        Entry.symlink("links/long-target", "/".join(["segment"] * 50)),
        Entry.symlink("links/owned", "hard-a", mtime_ns=_seconds(1_000_000_000), **odd),
        # Special bits.
        Entry.file("special/setuid", b"#!/bin/sh\n", mode=0o4755),
        Entry.hardlink("special/setuid-link", "special/setuid"),
        Entry.file("special/setgid", b"#!/bin/sh\n", mode=0o2755, gid=50),
        Entry.dir("special/sticky", mode=0o1777),
        Entry.dir("special/setgid-dir", mode=0o2775, gid=50),
        Entry.file("special/all-bits", b"", mode=0o7777),
        Entry.file("special/no-bits", b"unreadable\n", mode=0o000),
        # Devices and a FIFO (minor 65537 needs the kernel's wide dev_t encoding).
        Entry.char_device("dev/null", 1, 3),
        Entry.char_device("dev/tty-ish", 4, 64, mode=0o620, gid=5),
        Entry.block_device("dev/loop0", 7, 0),
        Entry.block_device("dev/wide-minor", 259, 65537),
        Entry.fifo("dev/fifo", mode=0o600),
        # Extended attributes, including a binary capability.
        Entry.dir("xattrs", xattrs={"user.on-dir": b"directory attribute"}),
        Entry.file("xattrs/user", b"has user xattrs\n",
                   xattrs={"user.comment": b"hello world", "user.binary": bytes(range(256)),
                           "user.long": seeded_bytes("xattr", 3000)}),
        Entry.file("xattrs/capability", b"#!/bin/sh\n", mode=0o755,
                   xattrs={"security.capability": NET_BIND_CAPABILITY}),
        # Owners: odd ids, ids too big for ustar, names that disagree with the ids.
        Entry.dir("owners", mode=0o750, **odd),
        Entry.file("owners/odd", b"1234:5678\n", **odd),
        Entry.file("owners/huge-ids", b"3000000:4000000\n", uid=3_000_000, gid=4_000_000),
        Entry.file("owners/name-mismatch", b"names say root\n", uid=4321, gid=8765, uname="root", gname="root"),
        Entry.fifo("owners/odd-fifo", **odd),
        # Times: early, around 2038, far future, with nanoseconds.
        Entry.file("times/epoch-plus-one", b"1970\n", mtime_ns=_seconds(1)),
        Entry.file("times/y1985", b"1985\n", mtime_ns=_seconds(489_024_000)),
        Entry.file("times/after-2038", b"2038\n", mtime_ns=_seconds(2**31 + 100)),
        Entry.file("times/y2100", b"2100\n", mtime_ns=_seconds(4_102_444_800)),
        Entry.file("times/y2242", b"2242\n", mtime_ns=_seconds(2**33)),
        Entry.file("times/nanoseconds", b"ns\n", mtime_ns=1_700_000_000_123_456_789),
        Entry.symlink("times/old-symlink", "epoch-plus-one", mtime_ns=_seconds(315_532_800)),
        Entry.fifo("times/old-fifo", mtime_ns=_seconds(86_400)),
        # Names.
        Entry.file("names/héllo wörld ✓.txt", b"unicode\n"),
        Entry.file("names/日本語のファイル", b"more unicode\n"),
        Entry.file("names/with space & 'quotes' $x", b"shell characters\n"),
        Entry.file("names/-leading-dash", b"dash\n"),
        Entry.file("names/.hidden", b"dot\n"),
        Entry.file("names/.whale", b"starts with .wh but is no whiteout\n"),
        Entry.file(LONG_NAME, b"a 240 character name\n"),
        Entry.file(f"{DEEP_DIR}/leaf.txt", b"deep\n"),
    )
    changes = (
        Entry.file("etc/hostname", b"features-layer-2\n"),
        Entry.whiteout("data/to-delete.txt"),
        Entry.whiteout("data/dir-to-delete"),
        Entry.whiteout("data/reborn.txt"),
        Entry.whiteout("data/never-existed"),
        Entry.dir("data/opaque", mode=0o750, **odd),
        Entry.opaque("data/opaque"),
        Entry.file("data/opaque/new.txt", b"the only child now\n"),
        Entry.file("data/dir-becomes-file", b"was a directory\n"),
        Entry.dir("data/file-becomes-dir"),
        Entry.file("data/file-becomes-dir/inside", b"was a file\n"),
        Entry.symlink("data/file-becomes-symlink", "hello.txt"),
        Entry.file("data/chmod-only", b"same content, new metadata\n", mode=0o600, **odd),
        Entry.file("data/merged/upper.txt", b"from layer 2\n"),
        Entry.whiteout("links/pair-c"),
        Entry.file("xattrs/user", b"has user xattrs\n", xattrs={"user.comment": b"changed in layer 2"}),
    )
    top = (
        Entry.file(LARGE_FILE_PATH, seeded_bytes("large", large_file_size)),
        Entry.file("data/reborn.txt", b"second life\n"),
        Entry.dir("data/dir-to-delete", mode=0o711),
        Entry.file("data/dir-to-delete/fresh", b"the old a and sub/b stay deleted\n"),
    )
    layers = (LayerSpec(base, compressions[0], created_by="features: base"),
              LayerSpec(changes, compressions[1], created_by="features: deletions and changes"),
              LayerSpec(top, compressions[2], created_by="features: large file and re-creations"))
    absent = {"/data/to-delete.txt", "/data/dir-to-delete/a", "/data/dir-to-delete/sub",
              "/data/opaque/old-1", "/data/opaque/old-sub", "/data/dir-becomes-file/inside",
              "/links/pair-c", "/data/never-existed", "/data/.wh.to-delete.txt",
              "/data/opaque/.wh..wh..opq"}
    return layers, facts_from_layers(layers, absent=absent)


# name -> (media types pushed, compression of each layer)
FEATURES_FLAVOURS: dict[str, tuple[MediaTypes, tuple[Compression, Compression, Compression]]] = {
    "oci-gzip": ("oci", ("gzip", "gzip", "gzip")),
    "oci-zstd": ("oci", ("zstd", "zstd", "zstd")),
    "oci-uncompressed": ("oci", ("none", "none", "none")),
    "oci-mixed": ("oci", ("gzip", "zstd", "none")),
    "docker-gzip": ("docker", ("gzip", "gzip", "gzip")),
}


def features_image(flavour: str = "oci-mixed", *, large_file_size: int = LARGE_FILE_SIZE
                   ) -> tuple[ImageSpec, MediaTypes, ImageFacts]:
    """The features image in one of `FEATURES_FLAVOURS`: its spec, media types and facts."""
    media_types, compressions = FEATURES_FLAVOURS[flavour]
    layers, facts = features_layers(compressions, large_file_size=large_file_size)
    spec = ImageSpec(layers, Platform("linux", "amd64"), cmd=("/bin/sh",),
                     labels={"org.afsd.test-image": f"features/{flavour}"})
    return spec, media_types, facts


MULTIARCH_PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64", "v8"),
                       Platform("linux", "riscv64"))
_MULTIARCH_COMPRESSION: dict[str, Compression] = {"amd64": "gzip", "arm64": "zstd", "riscv64": "none"}


def multiarch_images() -> tuple[tuple[ImageSpec, ImageFacts], ...]:
    """One image per `MULTIARCH_PLATFORMS` entry, for an index: a shared base layer (the same blob
    in every manifest) plus a platform layer with distinguishable content, which deletes the base's
    `/shared/gone-on-<arch>` and writes `/etc/platform` (the platform as text)."""
    base = LayerSpec((
        Entry.file("shared/common.txt", b"in every platform\n"),
        *(Entry.file(f"shared/gone-on-{p.architecture}", f"deleted on {p.architecture}\n".encode())
          for p in MULTIARCH_PLATFORMS),
    ), "gzip", created_by="multiarch: shared base")
    images = []
    for platform in MULTIARCH_PLATFORMS:
        arch = platform.architecture
        layer = LayerSpec((
            Entry.file("etc/platform", f"{platform}\n".encode()),
            Entry.file(f"opt/{arch}/payload.bin", seeded_bytes(str(platform), 200_000 + 1000 * len(arch)),
                       mode=0o755),
            Entry.symlink("opt/current", arch),
            Entry.whiteout(f"shared/gone-on-{arch}"),
        ), _MULTIARCH_COMPRESSION[arch], created_by=f"multiarch: {platform}")
        layers = (base, layer)
        facts = facts_from_layers(layers, absent={f"/shared/gone-on-{arch}"})
        images.append((ImageSpec(layers, platform, labels={"org.afsd.test-image": f"multiarch/{platform}"}),
                       facts))
    return tuple(images)


def implicit_parents_layers() -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Two layers where the upper one adds files under directories it does not list itself.

    OCI layer.md: without whiteouts a changeset "is extracted like a regular tar archive", and tar
    extraction leaves existing parent directories alone (so do docker and containerd, which apply a
    layer on top of the ones below). So `/srv/app` keeps layer 1's mode 0700, owner 1234:5678 and
    xattr although layer 2 writes into it; the implicit `/srv/app/deeper` is new and gets defaults.
    """
    lower = LayerSpec((Entry.dir("srv", mode=0o755),
                       Entry.dir("srv/app", mode=0o700, uid=1234, gid=5678,
                                 xattrs={"user.from": b"layer 1"}),
                       Entry.file("srv/app/old.txt", b"layer 1\n")), "gzip")
    upper = LayerSpec((Entry.file("srv/app/new.txt", b"layer 2, no parent entries\n"),
                       Entry.file("srv/app/deeper/file.txt", b"and a parent created implicitly\n")),
                      "gzip", add_parents=False)
    layers = (lower, upper)
    return layers, facts_from_layers(layers, paths={"/srv", "/srv/app", "/srv/app/old.txt",
                                                    "/srv/app/new.txt", "/srv/app/deeper/file.txt"})


# ---------------------------------------------------------------------------------------------
# A real Debian root filesystem, built once and cached
# ---------------------------------------------------------------------------------------------

# Bump when the layer plan below changes: it is part of the cache key.
DEBIAN_BUILDER_VERSION = 1
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_TAG = "debian"


def image_cache_root() -> Path:
    """`$XDG_CACHE_HOME/afsd/images`, by default `~/.cache/afsd/images`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "afsd" / "images"


def entry_for_path(root: Path, relative: str) -> Entry:
    """An `Entry` describing `root/relative` as it is on disk (a regular file's content by path)."""
    path = root / relative
    st = os.lstat(path)
    common = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
              "mtime_ns": st.st_mtime_ns}
    xattrs = {name: os.getxattr(path, name, follow_symlinks=False)
              for name in os.listxattr(path, follow_symlinks=False)}
    if stat.S_ISDIR(st.st_mode):
        return Entry(relative, "dir", xattrs=xattrs, **common)  # type: ignore[arg-type]
    if stat.S_ISREG(st.st_mode):
        return Entry(relative, "file", source=path, xattrs=xattrs, **common)  # type: ignore[arg-type]
    if stat.S_ISLNK(st.st_mode):
        return Entry(relative, "symlink", linkname=os.readlink(path), **common)  # type: ignore[arg-type]
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return Entry(relative, "char" if stat.S_ISCHR(st.st_mode) else "block", xattrs=xattrs,
                     devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev), **common)  # type: ignore[arg-type]
    if stat.S_ISFIFO(st.st_mode):
        return Entry(relative, "fifo", xattrs=xattrs, **common)  # type: ignore[arg-type]
    raise ValueError(f"{path}: sockets and unknown file types cannot go into a layer")


def entries_from_directory(root: Path) -> list[Entry]:
    """Every path under `root` (not `root` itself) as layer entries, parents before children,
    hardlinked files as one file plus hardlink entries, sockets left out (tar cannot hold them)."""
    entries: list[Entry] = []
    first_path: dict[tuple[int, int], str] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative_dir = os.path.relpath(directory, root)
        for name in sorted(dirnames) + sorted(filenames):
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            st = os.lstat(root / relative)
            if stat.S_ISSOCK(st.st_mode):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                first = first_path.setdefault((st.st_dev, st.st_ino), relative)
                if first != relative:
                    entries.append(Entry.hardlink(relative, first))
                    continue
            entries.append(entry_for_path(root, relative))
    return entries


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """`rm -rf path`, after unmounting anything a crashed debootstrap left mounted inside it."""
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "-l", mount_point], check=False)
    if _mounts_under(path):
        raise ImageBuildError(f"cannot remove {path}: mounts inside it remain; unmount them first")
    shutil.rmtree(path, ignore_errors=True)


def _debootstrap(rootfs: Path, suite: str, variant: str, mirror: str) -> None:
    binary = shutil.which("debootstrap")
    if binary is None:
        raise MissingToolError("debootstrap is not installed; run scripts/setup.sh (Debian package debootstrap)")
    result = subprocess.run([binary, f"--variant={variant}", suite, str(rootfs), mirror],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = result.stdout.decode(errors="replace").strip().splitlines()[-3:]
        raise ImageBuildError(f"debootstrap {suite} from {mirror} failed: {' / '.join(tail)}")


def _busybox_rootfs(rootfs: Path) -> None:
    """A small root filesystem around busybox-static: the fallback when no Debian mirror answers."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise MissingToolError("busybox is not installed; run scripts/setup.sh (Debian package busybox-static)")
    for directory, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                            ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("var/log", 0o755),
                            ("usr/share/doc/busybox", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755)):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / directory, mode)
    shutil.copy2(busybox, rootfs / "bin/busybox")
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
    os.link(rootfs / "bin/busybox", rootfs / "usr/bin/busybox-hardlink")
    shutil.copy2(busybox, rootfs / "usr/bin/su-busybox")
    os.chmod(rootfs / "usr/bin/su-busybox", 0o4755)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/hostname").write_text("busybox\n")
    (rootfs / "var/log/boot.log").write_text("built by afsd.lab.images\n")
    (rootfs / "usr/share/doc/busybox/README").write_text("busybox-static fallback root filesystem\n")


def debian_layers(rootfs: Path) -> tuple[tuple[LayerSpec, ...], ImageFacts]:
    """Three layers from a root filesystem on disk: all of it (gzip); a layer (zstd) that deletes
    /usr/share/doc and one member of a hardlink group, makes /var/log opaque, drops the setuid bit
    of one program and rewrites /etc/hostname; and a small uncompressed layer that adds a script.
    Parent directories in the upper layers carry the root filesystem's own metadata, as a layer
    diffed by docker would."""
    base = LayerSpec(tuple(entries_from_directory(rootfs)), "gzip", created_by="debian: root filesystem")
    changes: list[Entry] = []
    top: list[Entry] = []

    def add_with_parents(relative: str, *entries: Entry, layer: list[Entry] = changes) -> None:
        parts = PurePosixPath(relative).parts[:-1]
        listed = {e.name for e in layer}
        for i in range(len(parts)):
            parent = "/".join(parts[:i + 1])
            if parent not in listed and (rootfs / parent).is_dir():
                listed.add(parent)
                layer.append(entry_for_path(rootfs, parent))
        layer.extend(entries)

    hardlink_groups: dict[str, list[str]] = {}
    setuid: list[str] = []
    for entry in base.entries:
        if entry.kind == "hardlink" and entry.name.startswith("usr/bin/"):
            hardlink_groups.setdefault(entry.linkname, [entry.linkname]).append(entry.name)
        if entry.kind == "file" and entry.name.startswith("usr/bin/") and entry.mode & stat.S_ISUID:
            setuid.append(entry.name)
    interesting = {"/bin", "/etc/passwd", "/etc/hostname", "/etc/afsd-release", "/etc/motd", "/var/log",
                   "/var/log/afsd.log", "/opt/afsd/hello.sh", "/usr/local/bin/hello"}
    absent = {"/var/log/.wh..wh..opq"} | {f"/var/log/{name}" for name in os.listdir(rootfs / "var/log")}
    if (rootfs / "usr/share/doc").is_dir():
        add_with_parents("usr/share/doc", Entry.whiteout("usr/share/doc"))
        absent.add("/usr/share/doc")
    if hardlink_groups:
        group = sorted(hardlink_groups.values())[0]
        add_with_parents(group[-1], Entry.whiteout(group[-1]))
        absent.add(f"/{group[-1]}")
        interesting.update(f"/{p}" for p in group[:-1])
    if setuid:
        program = entry_for_path(rootfs, sorted(setuid)[0])
        add_with_parents(program.name, replace(program, mode=program.mode & ~stat.S_ISUID))
        interesting.add(f"/{program.name}")
    add_with_parents("var/log/afsd.log", Entry.opaque("var/log"),
                     Entry.file("var/log/afsd.log", b"the only log left\n", mode=0o640))
    add_with_parents("etc/hostname", Entry.file("etc/hostname", b"afsd-debian\n"),
                     Entry.file("etc/afsd-release", b"afsd test image, layer 2\n"))
    add_with_parents("opt/afsd/hello.sh",
                     Entry.file("opt/afsd/hello.sh", b"#!/bin/sh\necho hello from the top layer\n", mode=0o755),
                     layer=top)
    add_with_parents("usr/local/bin/hello", Entry.symlink("usr/local/bin/hello", "/opt/afsd/hello.sh"),
                     layer=top)
    add_with_parents("etc/motd", Entry.file("etc/motd", b"layer 3 was here\n"), layer=top)
    layers = (base, LayerSpec(tuple(changes), "zstd", created_by="debian: deletions and changes"),
              LayerSpec(tuple(top), "none", created_by="debian: a script"))
    state, _ = apply_layers(layers)
    return layers, facts_from_layers(layers, paths=interesting & set(state), absent=absent)


@dataclass(frozen=True)
class CachedImage:
    """An image layout kept in the image cache, with what is known about it."""

    layout: LayoutImage
    facts: ImageFacts
    source: str  # "debootstrap" or "busybox-static"
    fallback_reason: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def debian_layout(cache_root: Path | None = None, *, suite: str = "bookworm", variant: str = "minbase",
                  mirror: str = DEBIAN_MIRROR, allow_fallback: bool = True) -> CachedImage:
    """The Debian test image as an OCI layout, built on first use and cached.

    The cache entry is `<cache_root>/<key>` where the key hashes suite, variant, mirror and
    `DEBIAN_BUILDER_VERSION`; it is built in a `.partial-<key>-<pid>` directory and renamed into
    place, so an interrupted build never leaves a half entry (partial directories of dead builders
    are removed on the next call). If debootstrap cannot reach the mirror and `allow_fallback`
    is set, a busybox-static root filesystem stands in (`CachedImage.source` says which).
    """
    cache_root = cache_root or image_cache_root()
    key_doc = {"suite": suite, "variant": variant, "mirror": mirror, "builder": DEBIAN_BUILDER_VERSION}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    final = cache_root / key
    if (final / "image.json").exists():
        return _load_cached(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    for stale in cache_root.glob(f".partial-{key}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            remove_tree(stale)

    if final.exists():
        remove_tree(final)  # damaged by hand: entries only ever appear complete
    work = cache_root / f".partial-{key}-{os.getpid()}"
    remove_tree(work)
    work.mkdir()
    try:
        rootfs = work / "rootfs"
        source, reason = "debootstrap", ""
        try:
            _debootstrap(rootfs, suite, variant, mirror)
        except ImageBuildError as error:
            if not allow_fallback:
                raise
            source, reason = "busybox-static", str(error)
            remove_tree(rootfs)
            rootfs.mkdir()
            _busybox_rootfs(rootfs)
        layers, facts = debian_layers(rootfs)
        spec = ImageSpec(layers, Platform("linux", "amd64"), cmd=("/bin/bash",) if source == "debootstrap"
                         else ("/bin/sh",), labels={"org.afsd.test-image": f"{source}/{suite}"})
        write_oci_layout(work / "layout", DEBIAN_TAG, spec)
        remove_tree(rootfs)
        (work / "image.json").write_text(json.dumps({
            "key": key_doc, "source": source, "fallback_reason": reason, "tag": DEBIAN_TAG,
            "facts": facts.to_json()}, indent=2))
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "image.json").exists():
                raise
            remove_tree(work)  # another process finished the same build first
    except BaseException:
        remove_tree(work)
        raise
    return _load_cached(final)


def _load_cached(entry: Path) -> CachedImage:
    doc = json.loads((entry / "image.json").read_text())
    return CachedImage(read_layout(entry / "layout", doc["tag"]), ImageFacts.from_json(doc["facts"]),
                       doc["source"], doc["fallback_reason"])
