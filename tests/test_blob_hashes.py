"""A whole blob is checked the same way wherever it is copied or adopted (afsd/cluster/peers.py BlobHashes:
the blob digest and the metadata digest over bytes handed over in order), here through the layerstore's
adoption of a blob assembled on this node, on a real converted blob: the true file is kept, a forged
metadata digest, a forged blob digest and a file of another size are each refused with one line naming the file,
and nothing is left at the destination."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from afsd.cluster.layerstore import _link_or_copy_verified
from afsd.cluster.peers import PeerLayer
from afsd.erofs.convert import BlobInfo
from afsd.errors import DigestMismatchError
from tests.support import fanotify_lab
from tests.support.fanotify_lab import markable_temp_root

pytest_plugins = ["tests.support.fanotify"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="afsd-blobhashes-", dir=markable_temp_root()))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def layer_of(blob: fanotify_lab.TestBlob, **forged: str) -> PeerLayer:
    spec = blob.spec
    info = BlobInfo(blob_id="sha256:" + "0" * 64, layer_digest=spec.layer_digest, diff_id="", size=spec.size,
                    digest=spec.blob_digest, data_map=list(spec.data_map), chunk_size=spec.chunk_size,
                    chunk_digests=list(spec.chunk_digests), converter="test", implicit_dirs=[],
                    metadata_digest=spec.metadata_digest)
    return PeerLayer(spec.layer_digest, "", 0, dataclasses.replace(info, **forged))


def test_the_true_blob_is_kept(fanotify_blob: fanotify_lab.TestBlob, workdir: Path) -> None:
    assert fanotify_blob.spec.metadata_digest   # a blob whose metadata is checked too
    _link_or_copy_verified(fanotify_blob.full, workdir / "kept", layer_of(fanotify_blob))
    assert (workdir / "kept").read_bytes() == fanotify_blob.full.read_bytes()


@pytest.mark.parametrize("forged, complaint", [
    ({"metadata_digest": "sha256:" + "e" * 64}, "its metadata does not match metadata digest sha256:eeee"),
    ({"digest": "sha256:" + "d" * 64}, "does not match blob digest sha256:dddd"),
])
def test_a_forged_digest_is_one_line_naming_the_file(fanotify_blob: fanotify_lab.TestBlob, workdir: Path,
                                                      forged: dict[str, str], complaint: str) -> None:
    with pytest.raises(DigestMismatchError, match=complaint) as refused:
        _link_or_copy_verified(fanotify_blob.full, workdir / "refused", layer_of(fanotify_blob, **forged))
    assert str(fanotify_blob.full) in str(refused.value) and "\n" not in str(refused.value)
    assert not (workdir / "refused").exists()


@pytest.mark.parametrize("change", [1, -1])
def test_a_file_of_another_size_is_refused(fanotify_blob: fanotify_lab.TestBlob, workdir: Path, change: int) -> None:
    data, resized = fanotify_blob.full.read_bytes(), workdir / "resized"
    resized.write_bytes(data + b"\0" if change > 0 else data[:-1])
    with pytest.raises(DigestMismatchError, match=f"has {len(data) + change} bytes, the blob .* has {len(data)}"):
        _link_or_copy_verified(resized, workdir / "refused", layer_of(fanotify_blob))
    assert not (workdir / "refused").exists()
