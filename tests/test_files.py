"""Atomic writes: the old file survives a failed write and no temp file is left behind."""
import json

import pytest

from ppd_engine.files import write_json_atomic, write_text_atomic


def test_write_then_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("ppd_engine.files.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new contents")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_unserialisable_object_leaves_nothing(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert list(tmp_path.iterdir()) == []
