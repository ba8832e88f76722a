"""tests/vm: kernel-level tests that need the lab kernel (cachefiles on-demand, erofs in fscache mode).

Inside the VM (AFSD_IN_VM=1, set by tests/vm/init.sh, or by hand on a machine booted into the lab kernel)
these tests run for real. On the host, every test collected here is replaced by a proxy that reports the
outcome of the same test run inside ONE VM boot per session (tests/vm/runner.py). Every test here gets the
`vm` marker, so `-m "not vm"` leaves them out. See docs/kernel-lab.md.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.vm import runner

IN_VM = os.environ.get("AFSD_IN_VM") == "1"
HERE = Path(__file__).resolve().parent
# Filesystems that cachefiles accepts for its cache directory (tmpfs lacks sync_fs, 9p lacks O_TMPFILE).
DISK_FILESYSTEMS = ("ext4", "xfs", "btrfs")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: a kernel-level test under tests/vm/, run inside the lab VM")


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselection, so `-m "not vm"` sees the marker
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for index, item in enumerate(items):
        if HERE not in item.path.resolve().parents:
            continue
        item.add_marker(pytest.mark.vm)
        if not IN_VM:
            items[index] = runner.VmTestItem.replacing(item)


def pytest_sessionfinish(session: pytest.Session) -> None:
    runner.finish(session)


def filesystem_type(path: Path) -> str:
    return subprocess.run(
        ["findmnt", "-no", "FSTYPE", "--target", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def disk_tmp_path(tmp_path: Path) -> Path:
    """tmp_path, checked to be on ext4/xfs/btrfs: in the VM --basetemp lives on the ext4 scratch disk."""
    fstype = filesystem_type(tmp_path)
    if fstype not in DISK_FILESYSTEMS:
        pytest.fail(f"{tmp_path} is on {fstype}; kernel-level tests need ext4/xfs/btrfs (set --basetemp or TMPDIR)")
    return tmp_path
