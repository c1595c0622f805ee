"""The sharded embedding store at Pick-a-Pic scale: 50,000 records, appends that never rewrite,
lazy reads of one user, several writers, and refusal of non-finite or truncated data at load."""

import json
import os
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from ppd_engine.embed.store import EmbeddingStore, StoreError
from ppd_engine.integrity import sha256_file


def test_fifty_thousand_records_reopen_and_read_one_user_lazily(tmp_path):
    path = str(tmp_path / "users")
    store = EmbeddingStore(path)
    profile = "p" * 4096
    users, k, per_append = 12_500, 4, 2_500
    t0 = time.perf_counter()
    sizes = []
    for a in range(0, users, per_append):
        store.append_many([(f"user{u:05d}", torch.full((k, 1, 8), float(u)),
                            {"chunks": [{"profile": profile, "chunk": c} for c in range(k)]})
                           for u in range(a, a + per_append)])
        sizes.append(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)))
    write_s = time.perf_counter() - t0
    # Appends write a new shard each: the bytes already on disk are never rewritten.
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(growth) < 1.1 * min(growth)
    assert sizes[-1] > 50_000 * 4096
    tracemalloc.start()
    again = EmbeddingStore(path)
    assert len(again) == users and again.count("user07777") == k
    e = again.get("user07777")
    meta = again.meta("user07777")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert torch.equal(e, torch.full((k, 1, 8), 7777.0)) and [m["chunk"] for m in meta] == list(range(k))
    assert meta[0]["profile"] == profile
    # 200 MB of profiles on disk; opening the store and reading one user holds a few MB.
    assert peak < 16 << 20, (peak, write_s)


def test_non_finite_embeddings_are_refused_at_load_naming_the_user(tmp_path):
    path = str(tmp_path / "users")
    EmbeddingStore(path).append("good", torch.randn(1, 1, 4))
    s = EmbeddingStore(path)
    s.append("bad", torch.randn(1, 1, 4))
    # A disk (or another tool) puts a NaN where append never would.
    shard = os.path.join(path, "r0-00001.safetensors")
    save_file({"user/bad": torch.tensor([[[1.0, float("nan"), 0.0, 2.0]]])}, shard)
    # ... and records the new file's hash, so the content check passes and the finiteness check is reached.
    index = os.path.join(path, "r0-00001.json")
    doc = json.load(open(index))
    doc["sha256"]["safetensors"] = sha256_file(shard)
    json.dump(doc, open(index, "w"))
    again = EmbeddingStore(path)
    assert again.get("good").shape == (1, 1, 4)
    with pytest.raises(StoreError, match="'bad'.*NaN"):
        again.get("bad")
    with pytest.raises(StoreError, match="'bad'"):
        again.as_mapping()


def test_truncated_shard_is_a_one_line_error_naming_the_file(tmp_path):
    path = str(tmp_path / "users")
    EmbeddingStore(path).append("u", torch.randn(2, 1, 4))
    shard = os.path.join(path, "r0-00000.safetensors")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) - 9])
    with pytest.raises(StoreError) as e:
        EmbeddingStore(path).get("u")
    assert shard in str(e.value) and "\n" not in str(e.value)


def test_two_writers_make_one_store_and_uncommitted_shards_are_ignored(tmp_path):
    path = str(tmp_path / "users")
    a, b = EmbeddingStore(path, writer="r0"), EmbeddingStore(path, writer="r1")
    a.append("u1", torch.randn(1, 2, 3), {"chunks": [{"profile": "one"}]})
    b.append("u2", torch.randn(2, 2, 3))
    a.append("u1", torch.randn(1, 2, 3), {"chunks": [{"profile": "two"}]})
    # A killed append: tensors written, index not.
    save_file({"user/ghost": torch.randn(1, 2, 3)}, os.path.join(path, "r1-00001.safetensors"))
    s = EmbeddingStore(path)
    assert s.users() == ["u1", "u2"] and s.count("u1") == 2
    assert [m["profile"] for m in s.meta("u1")] == ["one", "two"]
    assert EmbeddingStore(path, writer="r1").remove_uncommitted() == 1
    assert not os.path.exists(os.path.join(path, "r1-00001.safetensors"))
    assert EmbeddingStore(path).users() == ["u1", "u2"]
    lazy = s.lazy_mapping(["u2", "nobody"])
    assert list(lazy) == ["u2"] and "u1" not in lazy and lazy["u2"].shape == (2, 2, 3)
