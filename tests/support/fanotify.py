"""Pytest fixtures for the fanotify backend tests (a plugin: test modules list it in `pytest_plugins`).

- `fanotify_blob` (session): a real erofs test blob (tests.support.fanotify_lab.build_test_blob).
- `fanotify_lab`: a FanotifyLab in a fresh directory on ext4/xfs/btrfs; at teardown it unmounts,
  unregisters, stops the supervisor, keeper and workers and fails the test if any process is left.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.fanotify_lab import FanotifyLab, TestBlob, build_test_blob, markable_temp_root


@pytest.fixture(scope="session")
def fanotify_blob() -> Iterator[TestBlob]:
    directory = Path(tempfile.mkdtemp(prefix="afsd-fanblob-", dir=markable_temp_root()))
    try:
        yield build_test_blob(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def fanotify_lab(fanotify_blob: TestBlob) -> AsyncIterator[FanotifyLab]:
    # Short path: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="afsd-fan-", dir=markable_temp_root()))
    lab = FanotifyLab(root, fanotify_blob)
    try:
        yield lab
    finally:
        try:
            await lab.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
