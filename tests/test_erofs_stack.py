"""Image stacking: directories a layer does not list keep the metadata OCI extraction gives them.

Every case converts real layer tars into erofs blobs, mounts them file-backed and stacks them with
overlayfs (`mount_image_stack`), then looks at the merged tree as a container would.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from afsd.erofs.convert import convert_layer
from afsd.erofs.mkfs import fsck_erofs
from afsd.erofs.mount import mount_erofs, unmount
from afsd.erofs.stack import DEFAULT_DIR_METADATA, DirMetadata, LayerTree, StackLayer, build_fixup, mount_image_stack
from tests.support.tars import DEFAULT_MTIME, Layer

SECOND = 10**9


def convert_all(layers: tuple[Layer, ...], out: Path) -> list[StackLayer]:
    """Each layer (bottom first) converted to an erofs blob under `out`."""
    out.mkdir(parents=True)
    converted = []
    for index, layer in enumerate(layers):
        layer_file = layer.write(out / f"layer-{index}.tar", "none")
        blob = out / f"layer-{index}.erofs"
        info = convert_layer(layer_file.path, "none", layer_file.digest, blob, expected_diff_id=layer_file.diff_id)
        fsck_erofs(blob)
        converted.append(StackLayer(blob, info.implicit_dirs))
    return converted


@pytest.fixture
def stacked(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """stacked(layer, ..., bottom first) -> the merged root of the image; unmounted at teardown."""
    with contextlib.ExitStack() as cleanup:
        def mount(*layers: Layer) -> Path:
            work = Path(tempfile.mkdtemp(prefix="image-", dir=tmp_path))
            target = work / "rootfs"
            target.mkdir()
            cleanup.enter_context(mount_image_stack(convert_all(layers, work / "blobs"), target,
                                                    scratch=work / "scratch"))
            return target
        yield mount


@pytest.fixture
def layer_trees(tmp_path: Path) -> Iterator[Callable[..., list[LayerTree]]]:
    """layer_trees(layer, ..., bottom first) -> each converted blob mounted on its own, as `LayerTree`s."""
    with contextlib.ExitStack() as cleanup:
        def mount(*layers: Layer) -> list[LayerTree]:
            work = Path(tempfile.mkdtemp(prefix="trees-", dir=tmp_path))
            trees = []
            for index, layer in enumerate(convert_all(layers, work / "blobs")):
                point = work / f"layer-{index}"
                point.mkdir()
                mount_erofs(layer.blob_path, point)
                cleanup.callback(unmount, point)
                trees.append(LayerTree(point, layer.implicit_dirs))
            return trees
        yield mount


def shown(path: Path) -> DirMetadata:
    """What the merged tree shows for a directory (overlayfs hides its own trusted.overlay.* xattrs)."""
    st = path.lstat()
    assert stat.S_ISDIR(st.st_mode), path
    xattrs = tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False))
                          for name in os.listxattr(path, follow_symlinks=False)))
    return DirMetadata(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                       xattrs=xattrs)


APP = DirMetadata(mode=0o700, uid=1234, gid=5678, mtime_ns=1_500_000_000 * SECOND + 500_000_000,
                  xattrs=(("user.from", b"layer 1"),))


def app_layer() -> Layer:
    """A bottom layer with an explicit `srv` and `srv/app` (with the `APP` metadata)."""
    return (Layer().dir("srv", mode=0o751, uid=2, gid=3, mtime=1_400_000_000)
            .dir("srv/app", mode=0o700, uid=1234, gid=5678, mtime="1500000000.5", xattrs={"user.from": b"layer 1"})
            .file("srv/app/old.txt", b"layer 1"))


SRV = DirMetadata(mode=0o751, uid=2, gid=3, mtime_ns=1_400_000_000 * SECOND)


def test_implicit_parent_keeps_the_lower_layers_metadata(stacked: Callable[..., Path]) -> None:
    root = stacked(app_layer(), Layer().file("srv/app/new.txt", b"layer 2, no parent entries"))
    assert shown(root / "srv/app") == APP
    assert shown(root / "srv") == SRV
    assert sorted(os.listdir(root / "srv/app")) == ["new.txt", "old.txt"]


def test_implicit_over_implicit_over_explicit_keeps_the_explicit_metadata(stacked: Callable[..., Path]) -> None:
    root = stacked(app_layer(), Layer().file("srv/app/one", b"1"), Layer().file("srv/app/two", b"2"))
    assert shown(root / "srv/app") == APP
    assert shown(root / "srv") == SRV
    assert sorted(os.listdir(root / "srv/app")) == ["old.txt", "one", "two"]


@pytest.mark.parametrize("deleted", ["srv/app", "srv"])
def test_a_whiteout_in_between_resets_to_the_defaults(deleted: str, stacked: Callable[..., Path]) -> None:
    root = stacked(app_layer(), Layer().whiteout(deleted), Layer().file("srv/app/new.txt", b"new"))
    assert shown(root / "srv/app") == DEFAULT_DIR_METADATA
    assert shown(root / "srv") == (DEFAULT_DIR_METADATA if deleted == "srv" else SRV)
    assert os.listdir(root / "srv/app") == ["new.txt"]


@pytest.mark.parametrize("recreate", ["implicitly", "with an entry"])
def test_a_directory_recreated_after_its_own_whiteout_hides_the_lower_one(
        recreate: str, stacked: Callable[..., Path]) -> None:
    # OCI: a whiteout applies to the lower layers only, so `.wh.app` then `app/...` in one layer means a
    # new, empty app holding just this layer's entries; the lower app's files must not show through.
    top = Layer().whiteout("srv/app")
    if recreate == "with an entry":
        top = top.dir("srv/app", mode=0o750)
    root = stacked(app_layer(), top.file("srv/app/new.txt", b"new"))
    assert os.listdir(root / "srv/app") == ["new.txt"]
    assert shown(root / "srv/app").mode == (0o750 if recreate == "with an entry" else 0o755)


def test_an_opaque_ancestor_resets_to_the_defaults(stacked: Callable[..., Path]) -> None:
    # The middle layer empties srv (its marker is its only mention of srv); the top one writes into
    # srv/app, which is new by then.
    root = stacked(app_layer(), Layer().opaque("srv").file("srv/other", b"o"), Layer().file("srv/app/new.txt", b"n"))
    assert shown(root / "srv/app") == DEFAULT_DIR_METADATA
    assert shown(root / "srv") == SRV  # an opaque marker hides the contents, not the directory's own metadata
    assert sorted(os.listdir(root / "srv")) == ["app", "other"]
    assert os.listdir(root / "srv/app") == ["new.txt"]


def test_an_opaque_ancestor_in_the_same_layer_resets_to_the_defaults(stacked: Callable[..., Path]) -> None:
    root = stacked(app_layer(), Layer().opaque("srv").file("srv/app/new.txt", b"n"))
    assert shown(root / "srv/app") == DEFAULT_DIR_METADATA
    assert shown(root / "srv") == SRV
    assert os.listdir(root / "srv/app") == ["new.txt"]


def test_an_explicit_directory_in_a_higher_layer_wins_without_a_fixup(
    layer_trees: Callable[..., list[LayerTree]], stacked: Callable[..., Path], tmp_path: Path
) -> None:
    top = (Layer().dir("srv", mode=0o755).file("srv/app/new.txt", b"n")
           .dir("srv/app", mode=0o750, uid=9, gid=9, mtime=1_600_000_000, xattrs={"user.top": b"2"}))
    layers = (app_layer(), top)
    # Only the root is implicit in both layers, and no layer lists it: nothing to fix.
    assert build_fixup(layer_trees(*layers), tmp_path / "fixup") is None
    assert not (tmp_path / "fixup").exists()
    root = stacked(*layers)
    assert shown(root / "srv/app") == DirMetadata(0o750, 9, 9, 1_600_000_000 * SECOND, (("user.top", b"2"),))
    assert shown(root / "srv") == DirMetadata(0o755, 0, 0, DEFAULT_MTIME * SECOND)
    assert sorted(os.listdir(root / "srv/app")) == ["new.txt", "old.txt"]


def test_ancestors_of_fixup_directories_keep_their_own_metadata(
    layer_trees: Callable[..., list[LayerTree]], stacked: Callable[..., Path], tmp_path: Path
) -> None:
    bottom = (Layer().dir("./", mode=0o750, uid=1, gid=1, mtime=1_100_000_000, xattrs={"user.root": b"r"})
              .dir("a", mode=0o711, uid=3, gid=3, mtime=1_200_000_000)
              .dir("a/b", mode=0o700, uid=4, gid=4, mtime=1_300_000_000, xattrs={"user.b": b"0"}))
    top = Layer().dir("a", mode=0o755, uid=5, gid=6, mtime=1_400_000_000).file("a/b/c/file", b"f")
    root = stacked(bottom, top)
    assert shown(root) == DirMetadata(0o750, 1, 1, 1_100_000_000 * SECOND, (("user.root", b"r"),))
    assert shown(root / "a") == DirMetadata(0o755, 5, 6, 1_400_000_000 * SECOND)  # the top layer's, not a default
    assert shown(root / "a/b") == DirMetadata(0o700, 4, 4, 1_300_000_000 * SECOND, (("user.b", b"0"),))
    assert shown(root / "a/b/c") == DEFAULT_DIR_METADATA  # new in the top layer
    # The fixup holds just the directories it must: a/b, and its ancestors to carry it.
    fixup = build_fixup(layer_trees(bottom, top), tmp_path / "fixup")
    assert fixup is not None
    assert sorted(str(p.relative_to(fixup)) for p in fixup.rglob("*")) == ["a", "a/b"]
    assert all(not entry.is_file() for entry in fixup.rglob("*"))


def test_names_that_are_not_utf8_are_fixed_up_too(stacked: Callable[..., Path]) -> None:
    name = "caf\udce9 100%"  # a Latin-1 byte, as tar carries it, and a `%`
    root = stacked(Layer().dir(name, mode=0o700, uid=77), Layer().file(f"{name}/new", b"n"))
    assert shown(root / name) == DirMetadata(0o700, 77, 0, DEFAULT_MTIME * SECOND)


def test_lookups_never_follow_a_layers_symlinks(stacked: Callable[..., Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    os.chown(outside / "sub", 4242, 4242)
    os.chmod(outside / "sub", 0o700)
    # The top layer makes a directory `link/sub` where the layer below has a symlink to `outside`.
    root = stacked(Layer().dir("keep", mode=0o700), Layer().symlink("link", str(outside)),
                   Layer().file("link/sub/file", b"f"))
    assert shown(root / "link") == DEFAULT_DIR_METADATA
    assert shown(root / "link/sub") == DEFAULT_DIR_METADATA


def test_writes_in_a_writable_stack_keep_the_fixed_metadata(tmp_path: Path) -> None:
    layers = convert_all((app_layer(), Layer().file("srv/app/new.txt", b"n")), tmp_path / "blobs")
    upper, work, target, scratch = (tmp_path / name for name in ("upper", "work", "rootfs", "scratch"))
    for directory in (upper, work, target):
        directory.mkdir()
    extra = tmp_path / "extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc/hostname").write_text("box\n")
    with mount_image_stack(layers, target, scratch=scratch, extra_dir=extra, upper=upper, work=work):
        (target / "srv/app/written").write_text("by the container")
        assert (target / "etc/hostname").read_text() == "box\n"
        seen = shown(target / "srv/app")  # its mtime is now the write's
        assert (seen.mode, seen.uid, seen.gid, seen.xattrs) == (APP.mode, APP.uid, APP.gid, APP.xattrs)
    # Copied up from the fixup: the container's own layer has the image's owner and mode too.
    st = (upper / "srv/app").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (APP.mode, APP.uid, APP.gid)
    assert os.getxattr(upper / "srv/app", "user.from") == b"layer 1"
    assert (upper / "srv/app/written").read_text() == "by the container"


def test_everything_is_unmounted_and_removed_on_exit(tmp_path: Path) -> None:
    layers = convert_all((app_layer(), Layer().file("srv/app/new.txt", b"n")), tmp_path / "blobs")
    target, scratch = tmp_path / "rootfs", tmp_path / "scratch"
    target.mkdir()
    with pytest.raises(RuntimeError, match="body failed"), mount_image_stack(layers, target, scratch=scratch):
        assert (scratch / "fixup").is_dir()
        raise RuntimeError("body failed")
    assert os.listdir(scratch) == [] and os.listdir(target) == []
    mounted = Path("/proc/self/mountinfo").read_text()
    assert str(scratch) not in mounted and str(target) not in mounted
