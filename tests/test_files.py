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


def test_publish_folder_replaces_a_finished_folder_whole(tmp_path):
    from ppd_engine.files import publish_folder

    final, tmp = tmp_path / "step-3", tmp_path / ".tmp-step-3"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    publish_folder(tmp, final)
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]  # no temp or old folder left
    tmp.mkdir()
    (tmp / "b").write_text("first")
    publish_folder(tmp, tmp_path / "step-4")  # nothing to replace
    assert (tmp_path / "step-4" / "b").read_text() == "first"


def test_move_aside_never_reuses_a_name(tmp_path):
    from ppd_engine.files import move_aside

    moved = []
    for i in range(3):  # within one second: the exclusive mkdir picks -2, -3
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text(str(i))
        moved.append(move_aside(run, "replaced"))
    assert len({m.name for m in moved}) == 3 and not (tmp_path / "run").exists()
    assert sorted((m / "config.yaml").read_text() for m in moved) == ["0", "1", "2"]
