"""The method's evaluation end to end on the Pick-a-Pic fixture and tiny random models: PPD and its
non-personalized baseline trained through the pickapic world (train.personalized=false), the base
model (NAME=base) and the prompted base (caption + profile), over seen and unseen users."""
from __future__ import annotations

import json

import pytest
import torch

from test_train import FAST, tiny_pipeline_dir

LONG_PROFILE = " ".join(["prefers soft watercolour light and muted colours over glossy renders"] * 12)


def _store_from_shots(data, path, seed=0):
    """An EmbeddingStore whose chunk 0 of every user is built from its few-shot split (as embed does),
    with a real-looking generation; user 103's has no profile section."""
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.embed.store import EmbeddingStore

    # The pair index, as embed and the world read it (corrupt JPEGs are found later, as they decode).
    shots, _ = load_pairs(str(data), load_images=False, progress=False).few_shot_split(n_shots=4, seed=seed)
    store = EmbeddingStore(str(path))
    g = torch.Generator().manual_seed(0)
    items = []
    for u, recs in shots.items():
        gen = "Pair 1:\nPreferred Image: a fox\nDispreferred Image: a box\nDifferences: style\n\n"
        if u != "103":
            gen += f"User Profile: {'short taste' if u == '101' else LONG_PROFILE}\n"
        items.append((u, torch.randn(1, 1, 24, generator=g),
                      {"chunks": [{"profile": gen, "shots": [{"uid_w": r.uid_w, "uid_l": r.uid_l, "caption": r.caption}
                                                             for r in recs]}]}))
    store.append_many(items)
    return store, shots


def _train(data, store, run, cache, extra=()):
    from ppd_engine.train import main

    assert main(["world=pickapic", f"data.folder={data}", f"data.embeddings={store.path}", "model.family=sd15",
                 f"model.pretrained={tiny_pipeline_dir('sd15')}", "model.resolution=32", f"cache.dir={cache}",
                 f"log.run_dir={run}", "data.unseen_fraction=0.3", *FAST, "train.max_steps=1", "optim.name=adamw",
                 *extra]) == 0


@pytest.mark.slow
def test_eval_base_ppd_dpo_prompted_over_seen_and_unseen_users(tmp_path):
    pytest.importorskip("matplotlib")
    from test_rewards import make_tiny_clip

    from ppd_engine.cache.dataset import PairCacheDataset  # noqa: F401  (the world's dataset)
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.eval.__main__ import main
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    data = tmp_path / "pickapic"
    write_pickapic_fixture(str(data), extra_users=4, pairs_per_extra_user=6)
    store, shots = _store_from_shots(data, tmp_path / "users.safetensors")
    _train(data, store, tmp_path / "ppd", tmp_path / "cache")
    _train(data, store, tmp_path / "dpo", tmp_path / "cache", ["train.personalized=false"])

    # users.json: every user's role, and shots that are exactly the embedding's pairs and never trained on.
    users = json.loads((tmp_path / "ppd" / "users.json").read_text())["users"]
    roles = {u: i["role"] for u, i in users.items()}
    assert set(roles.values()) == {"seen", "unseen"}
    train_keys = {(r.uid_w, r.uid_l) for r in load_pairs(str(data), load_images=False, progress=False).few_shot_split(4, 0)[1]}
    for u, info in users.items():
        keys = {(s["uid_w"], s["uid_l"]) for s in info["shots"]}
        assert keys == {(r.uid_w, r.uid_l) for r in shots[u]} and not keys & train_keys
    state = json.loads(next((tmp_path / "dpo" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["personalized"] is False

    clip = str(make_tiny_clip(tmp_path / "clip"))
    out = tmp_path / "eval"
    common = ["--store", store.path, "--prompts", "parti", "--limit", "3", "--steps", "2", "--guidance", "3",
              "--gen-batch-size", "3", "--device", "cpu", "--no-progress"]
    scoring = ["--pickscore-model", clip, "--rewards", "pickscore"]
    assert main(["run", "--out", str(out), "--run", "base=base", "--run", f"ppd={tmp_path / 'ppd'}",
                 "--run", f"dpo={tmp_path / 'dpo'}", "--run", "prompted=base", "--caption-profile", "prompted",
                 "--users", "all", *common, *scoring]) == 0
    res = json.loads((out / "results.json").read_text())
    kinds = {c: m["kind"] for c, m in res["checkpoints"].items()}
    assert kinds == {"base": "base", "ppd": "ppd", "dpo": "dpo", "prompted": "base"}
    wr = res["rewards"]["pickscore"]["win_rates"]
    # Every run against the base, base second; each with a 95% interval around it and the role split.
    for c in ("ppd", "dpo", "prompted"):
        w = wr[f"{c}_vs_base"]
        lo, hi = w["ci95"]
        assert 0.0 <= lo <= w["overall"] <= hi <= 1.0
        assert set(w["per_role"]) == {"seen", "unseen"}
        assert w["per_role"]["unseen"]["users"] == sum(r == "unseen" for r in res["roles"].values())
    assert res["roles"] == {u: roles[u] for u in res["users"]}
    # Same seeds, no adapters and no caption change: base and dpo differ only by dpo's trained adapters,
    # prompted differs from base only where a profile was appended (user 103 has none).
    s = res["scores"]["pickscore"]
    assert s["prompted"]["103"] == s["base"]["103"]
    assert s["prompted"]["101"] != s["base"]["101"]
    cap = res["captions"]["prompted"]
    assert cap["users_without_profile"] == 1 and cap["profiles"]["101"] == "short taste"
    long_users = [u for u in res["users"] if u not in ("101", "103")]
    assert cap["truncated"] == 3 * len(long_users) and cap["captions"] == 3 * len(res["users"])
    for f in ("win_rates_pickscore.png", "rewards_pickscore.png", "categories_pickscore.png", "training_curves.png"):
        assert (out / f).stat().st_size > 1000 and f in res["figures"]
        assert f"]({f})" in (out / "report.md").read_text()
    prov = res["provenance"]
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or prov["versions"]["torch"]
    assert "world: pickapic" in prov["configs"]["ppd"] and prov["configs"]["base"] == prov["configs"]["ppd"]

    # --users unseen selects by role; a store whose unseen embedding was built from other pairs is refused.
    out2 = tmp_path / "eval_unseen"
    assert main(["generate", "--out", str(out2), "--run", f"ppd={tmp_path / 'ppd'}", "--users", "unseen",
                 *common]) == 0
    m = json.loads((out2 / "manifest.json").read_text())
    assert m["users"] and all(roles[u] == "unseen" for u in m["users"])
    from ppd_engine.embed.store import EmbeddingStore

    bad = EmbeddingStore(str(tmp_path / "bad.safetensors"))
    bad.append_many([(u, store.get(u), {"chunks": [dict(store.meta(u)[0], **(
        {"shots": [{"uid_w": "x", "uid_l": "y"}]} if u == m["users"][0] else {}))]}) for u in store.users()])
    argv = ["generate", "--out", str(tmp_path / "bad"), "--run", f"ppd={tmp_path / 'ppd'}", "--users", "unseen",
            *common]
    argv[argv.index(store.path)] = bad.path
    assert main(argv) != 0


def test_bootstrap_interval_matches_resampling_the_pairs():
    """The multinomial shortcut gives the same interval as resampling same-index pairs (float64
    numpy reference, many resamples), ties included; and it narrows as samples grow."""
    import numpy as np

    from ppd_engine.eval.report import bootstrap_ci, win_rate

    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 3, 32).astype(float), rng.integers(0, 3, 32).astype(float)   # many ties
    w = (x > y) + 0.5 * (x == y)
    ref = np.quantile(w[rng.integers(0, 32, (100_000, 32))].mean(axis=1), [0.025, 0.975])
    lo, hi = bootstrap_ci(list(x), list(y), n_boot=100_000)
    assert (lo, hi) == pytest.approx(tuple(ref), abs=1 / 64 + 1e-9)
    assert lo <= win_rate(list(x), list(y)) <= hi
    big = rng.normal(size=(2, 3200))
    blo, bhi = bootstrap_ci(list(big[0]), list(big[1]))
    assert bhi - blo < (hi - lo) / 5
    assert bootstrap_ci([1.0, 2.0], [0.0, 0.0]) == (1.0, 1.0)


def test_run_kind_from_recorded_config_and_state(tmp_path):
    from ppd_engine.config import load_config, save_config
    from ppd_engine.eval.generate import parse_checkpoints

    for name, loss, personalized in (("ppd", "dpo", True), ("dpo", "dpo", False), ("sft", "sft", False),
                                     ("psft", "sft", True)):
        save_config(load_config(None, [f"loss.name={loss}"]), tmp_path / name / "config.yaml")
        step = tmp_path / name / "checkpoints" / "step-1"
        step.mkdir(parents=True)
        (step / "state.json").write_text(json.dumps({"step": 1, "personalized": personalized}))
    specs = parse_checkpoints([f"{n}={tmp_path / n}" for n in ("ppd", "dpo", "sft", "psft")] + ["base=base"],
                              caption_profile=["base"])
    assert [(c.kind, c.personalized, c.caption_profile) for c in specs] == [
        ("ppd", True, False), ("dpo", False, False), ("sft", False, False), ("sft-personalized", True, False),
        ("base", False, True)]
    with pytest.raises(ValueError, match="--caption-profile names unknown"):
        parse_checkpoints(["base=base"], caption_profile=["nope"])


def test_every_comparison_is_against_the_plain_base():
    from ppd_engine.eval.evaluate import plain_bases
    from ppd_engine.eval.report import compared_pairs

    manifest = {"checkpoints": {"base": {"kind": "base"}, "ppd": {"kind": "ppd"},
                                "prompted": {"kind": "base", "caption_profile": True}, "dpo": {"kind": "dpo"}}}
    assert plain_bases(manifest) == ["base"]
    assert compared_pairs(list(manifest["checkpoints"]), ["base"]) == [
        ("ppd", "base"), ("prompted", "base"), ("dpo", "base"), ("ppd", "prompted"), ("ppd", "dpo"),
        ("prompted", "dpo")]
