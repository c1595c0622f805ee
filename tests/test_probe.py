"""User-classification probe: finds separable users, stays near chance on inseparable ones, runs on
a store written from the tiny VLM."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ppd_engine.probe_users import ProbeConfig, main, probe, resolve_layers, split_users, topk_accuracy


def _synthetic(n_users=23, k=5, t=3, d=29, informative=(2,), spread=3.0, noise=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for u in range(n_users):
        center = torch.randn(t, d, generator=g) * spread
        e = torch.randn(k, t, d, generator=g) * noise
        for layer in range(t):
            if layer in informative:
                e[:, layer] += center[layer]
            else:  # no user information in this layer: every user draws from one distribution
                e[:, layer] = torch.randn(k, d, generator=g)
        out[f"user{u:03d}"] = e
    return out


def test_topk_accuracy_counts_correctly():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    acc = topk_accuracy(logits, y, ks=(1, 2, 16))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3) and acc[16] == 1.0


def test_probe_finds_separable_users_per_layer():
    data = _synthetic()
    r = probe(data, layers="all", cfg=ProbeConfig(epochs=150, hidden=64), progress=False)
    assert r["users"] == 23 and r["train"] == 23 * 4 and r["test"] == 23
    assert r["chance"][1] == pytest.approx(1 / 23) and r["chance"][16] == pytest.approx(16 / 23)
    good, bad = r["layers"][2], r["layers"][0]
    assert good[1] >= 0.9 and good[4] >= good[1] and good[16] == 1.0
    assert bad[1] <= 0.3  # chance is 0.043; an inseparable layer must not look informative


def test_split_and_layer_selection_errors():
    data = _synthetic(n_users=3, k=2)
    data["lonely"] = torch.randn(1, 3, 29)  # one embedding: nothing to hold out -> skipped
    tr_x, tr_y, te_x, te_y, users, skipped = split_users(data, 1)
    assert skipped == 1 and "lonely" not in users and tr_x.shape == (3, 3, 29) and te_y.tolist() == [0, 1, 2]
    assert resolve_layers("0,-1", 3) == [0, 2] and resolve_layers(None, 2) == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers("5", 3)
    with pytest.raises(ValueError, match="comma-separated"):
        resolve_layers("last", 3)
    with pytest.raises(ValueError, match=">= 2 users"):
        split_users({"a": torch.randn(3, 1, 4)}, 1)


def test_probe_cli_on_tiny_vlm_store(tmp_path):
    """Mechanics end to end: tiny VLM -> store (layers=all, 2 chunks per user) -> probe CLI."""
    from ppd_engine.embed.generate import GenerationSettings, VLMGenerator
    from ppd_engine.embed.pipeline import WorkItem, embed_users
    from ppd_engine.embed.prompt import ProfileTemplate
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.embed.vlm import load_vlm
    from ppd_engine.testing.tiny_vlm import NUM_LAYERS, make_tiny_llava

    folder = make_tiny_llava(str(tmp_path / "vlm"))
    model, processor = load_vlm(folder)
    from PIL import Image

    rng = np.random.default_rng(0)
    img = lambda: Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))  # noqa: E731
    items = [WorkItem(f"u{u}", c, [SimpleNamespace(caption=f"user {u} likes {c}{i}", image_w=img(),
                                                    image_l=img(), uid_w=f"{u}{c}{i}w", uid_l=f"{u}{c}{i}l")
                                    for i in range(2)])
             for u in range(3) for c in range(2)]
    store = EmbeddingStore(str(tmp_path / "users.safetensors"))
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=2, greedy=True, layers="all"))
    stats = embed_users(items, gen, ProfileTemplate(), store, batch_users=4, seed=0, model_id=folder,
                        progress=False)
    assert stats["chunks_embedded"] == 6 and stats["users_embedded"] == 3
    r = main(["--store", store.path, "--layers", "0,-1", "--epochs", "20", "--hidden", "16", "--no-progress",
              "--out", str(tmp_path / "probe.json")])
    assert r["users"] == 3 and r["test"] == 3 and set(r["layers"]) == {0, NUM_LAYERS}
    for acc in r["layers"].values():
        assert 0.0 <= acc[1] <= acc[4] <= acc[16] == 1.0
    assert (tmp_path / "probe.json").exists()
