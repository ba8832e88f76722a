"""afsd.fsutil.write_json_atomically: both the durable (fsynced) and the process-lifetime variant replace
the file whole and leave no partial file behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afsd.fsutil import write_json_atomically


@pytest.mark.parametrize("durable", [True, False])
def test_write_json_atomically_replaces_the_whole_document(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "record.json"
    write_json_atomically(path, {"version": 1, "ranges": [[0, 4096]] * 1000}, durable=durable)
    write_json_atomically(path, {"version": 2}, durable=durable)
    assert json.loads(path.read_text()) == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_write_json_atomically_leaves_the_old_file_when_the_document_cannot_be_encoded(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json_atomically(path, {"version": 1}, durable=False)
    with pytest.raises(TypeError):
        write_json_atomically(path, {"version": object()}, durable=False)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
