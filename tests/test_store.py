import json
import os

import pytest
import torch

from ppd_engine.embed.store import EmbeddingStore


def _rand(k, t=3, d=37):
    return torch.randn(k, t, d) * 2 + 0.5


def test_round_trip_and_meta(tmp_path):
    path = str(tmp_path / "s" / "users.safetensors")
    store = EmbeddingStore(path)
    assert len(store) == 0 and store.shape is None
    data = {"u1": _rand(1), "user with spaces/é": _rand(3), "u3": _rand(2)}
    for u, e in data.items():
        chunks = [{"profile": f"{u} likes {i}", "shots": [{"uid_w": f"w{i}", "uid_l": f"l{i}", "caption": "c"}]}
                  for i in range(e.shape[0])]
        store.append(u, e, {"model": "tiny", "prompt_sha256": "ab" * 32, "chunks": chunks})
    again = EmbeddingStore(path)
    assert again.users() == sorted(data)
    assert again.shape == (3, 37)
    for u, e in data.items():
        assert torch.equal(again.get(u), e)
        assert len(again.meta(u)) == e.shape[0]
        assert again.meta(u)[0]["model"] == "tiny"
        assert again.profile(u, e.shape[0] - 1) == f"{u} likes {e.shape[0] - 1}"
    assert set(again.as_mapping()) == set(data)
    # Metadata lives in jsonl beside the tensors, readable by people and tools.
    lines = [json.loads(l) for f in sorted(os.listdir(path)) if f.endswith(".jsonl") for l in open(os.path.join(path, f))]
    u3 = next(l for l in lines if l["user"] == "u3")
    assert len(u3["records"]) == 2 and u3["records"][1]["shots"][0]["uid_w"] == "w1"


def test_append_existing_user_keeps_everything(tmp_path):
    path = str(tmp_path / "users.safetensors")
    a, b, c = _rand(2), _rand(1), _rand(3)
    EmbeddingStore(path).append("u1", a, {"chunks": [{"profile": "p0"}, {"profile": "p1"}]})
    EmbeddingStore(path).append("u2", b, {"note": "x"})
    EmbeddingStore(path).append_many([("u1", c, {"chunks": [{"profile": f"q{i}"} for i in range(3)]})])
    s = EmbeddingStore(path)
    assert s.users() == ["u1", "u2"]
    assert torch.equal(s.get("u1"), torch.cat([a, c]))
    assert torch.equal(s.get("u2"), b)
    assert [m["profile"] for m in s.meta("u1")] == ["p0", "p1", "q0", "q1", "q2"]
    assert s.meta("u2") == [{"note": "x"}]


def test_bad_inputs_have_clear_errors(tmp_path):
    s = EmbeddingStore(str(tmp_path / "users.safetensors"))
    s.append("u1", _rand(1))
    with pytest.raises(ValueError, match="T_in, Du"):
        s.append("u2", _rand(1, t=1))
    with pytest.raises(ValueError, match="NaN"):
        s.append("u2", torch.full((1, 3, 37), float("nan")))
    with pytest.raises(ValueError, match=r"\(K, T_in, Du\)"):
        s.append("u2", torch.randn(3, 37))
    with pytest.raises(ValueError, match="chunks"):
        s.append("u2", _rand(2), {"chunks": [{"profile": "only one"}]})
    with pytest.raises(ValueError, match="plain JSON"):
        s.append("u2", _rand(1), {"obj": object()})
    with pytest.raises(KeyError, match="nobody"):
        s.get("nobody")
    (tmp_path / "users.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a user-embedding store"):
        EmbeddingStore(str(tmp_path / "users.pt"))
    # a failed append changes nothing, in memory or on disk
    assert s.users() == ["u1"] and EmbeddingStore(s.path).users() == ["u1"]


def test_crash_during_write_leaves_old_store(tmp_path, monkeypatch):
    path = str(tmp_path / "users.safetensors")
    first = _rand(2)
    EmbeddingStore(path).append("u1", first)
    import safetensors.torch as st

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        EmbeddingStore(path).append("u2", _rand(1))
    monkeypatch.undo()
    s = EmbeddingStore(path)
    assert s.users() == ["u1"] and torch.equal(s.get("u1"), first)
    assert not [f for f in os.listdir(path) if ".tmp" in f]


def test_foreign_folder_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a user-embedding store"):
        EmbeddingStore(str(tmp_path))
