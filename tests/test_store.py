import json
import os

import pytest
import torch

from ppd_engine.embed.store import EmbeddingStore, StoreError


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


def _two_shard_store(path):
    a, b = _rand(2), _rand(3)
    EmbeddingStore(path).append("u1", a, {"chunks": [{"profile": "p0"}, {"profile": "p1"}]})
    EmbeddingStore(path).append("u2", b, {"note": "x"})
    return a, b


def test_a_flipped_tensor_byte_is_refused_naming_the_shard(tmp_path):
    from ppd_engine.testing.corrupt import flip_tensor_byte

    path = str(tmp_path / "store")
    a, b = _two_shard_store(path)
    flip_tensor_byte(os.path.join(path, "r0-00000.safetensors"))
    s = EmbeddingStore(path)   # opening reads the small indexes only
    with pytest.raises(StoreError) as err:
        s.get("u1")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(os.path.join(path, "r0-00000.safetensors") + ":") and "sha256" in msg
    # The intact shard still serves its user, and its metadata (a separate, intact file) still reads.
    assert torch.equal(s.get("u2"), b) and s.meta("u1")[1]["profile"] == "p1"


def test_a_flipped_metadata_byte_is_refused_naming_the_jsonl(tmp_path):
    path = str(tmp_path / "store")
    a, _ = _two_shard_store(path)
    jsonl = os.path.join(path, "r0-00000.jsonl")
    text = open(jsonl, encoding="utf-8").read()
    # Same length and still valid JSON: only the hash can tell.
    with open(jsonl, "w", encoding="utf-8") as f:
        f.write(text.replace('"p1"', '"q1"'))
    s = EmbeddingStore(path)
    with pytest.raises(StoreError, match=r"r0-00000\.jsonl: content does not match the sha256"):
        s.meta("u1")
    assert torch.equal(s.get("u1"), a)


def test_a_clean_store_verifies_each_shard_once(tmp_path, monkeypatch):
    import ppd_engine.embed.store as store_mod

    path = str(tmp_path / "store")
    a, b = _two_shard_store(path)
    hashed = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    s = EmbeddingStore(path)
    for _ in range(2):
        assert torch.equal(s.get("u1"), a) and torch.equal(s.get("u2"), b)
        s._tensors.clear()   # force a re-read: the shard must not be hashed again
        assert [m["profile"] for m in s.meta("u1")] == ["p0", "p1"]
        s._meta.clear()
    assert sorted(hashed) == ["r0-00000.jsonl", "r0-00000.safetensors", "r0-00001.safetensors"]


def test_a_store_written_before_hashes_loads_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "store")
    a, _ = _two_shard_store(path)
    idx = os.path.join(path, "r0-00000.json")
    doc = json.load(open(idx))
    del doc["sha256"]
    json.dump(doc, open(idx, "w"))
    with caplog.at_level("WARNING"):
        s = EmbeddingStore(path)
    assert "1 shard(s) record no sha256" in caplog.text and "r0-00000" in caplog.text
    assert torch.equal(s.get("u1"), a)
