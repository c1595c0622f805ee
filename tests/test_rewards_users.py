"""Multi-reward synthetic users on real pairs: scores (resumable, sharded by rank), weighted
relabelling, the relabelled Pick-a-Pic folder, weight-vector embeddings, own rewards, Spearman."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ppd_engine.rewards_users import (SyntheticUsers, assign_user, own_reward_scores, read_scores,
                                      read_user_weights, relabel, score_pairs, spearman, standardisation,
                                      write_relabelled, write_weight_store)


class _MeanColour:
    """A reward model: the mean of one colour channel (prompt-free); counts the images it scored."""

    name = "mean_colour"

    def __init__(self, channel):
        self.channel, self.seen = channel, 0

    def score(self, images, prompts=None, progress=False):
        self.seen += len(images)
        return torch.tensor([float(np.asarray(im)[..., self.channel].mean()) for im in images])


@pytest.fixture
def pairs(tmp_path):
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    write_pickapic_fixture(str(tmp_path / "pap"), extra_users=3)
    return load_pairs(str(tmp_path / "pap"), min_pairs_per_user=1, decode_images=False, progress=False)


def test_score_pairs_resumes_and_shards_by_rank(pairs, tmp_path):
    recs = pairs.records
    out = tmp_path / "scores"
    red, green = _MeanColour(0), _MeanColour(1)
    # Two "ranks" share the pairs without overlap; together they cover all.
    s0 = score_pairs(recs, {"red": red, "green": green}, out, chunk=5, rank=0, world_size=2, progress=False)
    s1 = score_pairs(recs, {"red": red, "green": green}, out, chunk=5, rank=1, world_size=2, progress=False)
    assert s0["scored"] + s1["scored"] == len(recs) and red.seen == 2 * len(recs)
    scores = read_scores(out)
    assert set(scores) == {r.pair_id for r in recs}
    from ppd_engine.embed.prompt import as_pil
    r = recs[3]
    assert scores[r.pair_id]["red"][0] == pytest.approx(np.asarray(as_pil(r.image_w))[..., 0].mean())
    assert scores[r.pair_id]["green"][1] == pytest.approx(np.asarray(as_pil(r.image_l))[..., 1].mean())
    # A rerun scores nothing; a lost part is rescored, only its pairs.
    again = score_pairs(recs, {"red": red, "green": green}, out, rank=0, world_size=1, progress=False)
    assert again == {"scored": 0, "skipped": len(recs), "bad_images": 0}
    lost = sorted(out.glob("part-*.parquet"))[0]
    n_lost = len(__import__("pyarrow.parquet", fromlist=["x"]).read_table(lost))
    lost.unlink()
    again = score_pairs(recs, {"red": red, "green": green}, out, progress=False)
    assert again["scored"] == n_lost and set(read_scores(out)) == {r.pair_id for r in recs}


def test_relabel_flips_exactly_where_the_weighted_reward_disagrees(pairs):
    recs = pairs.records
    rng = np.random.default_rng(0)
    scores = {r.pair_id: {"clipscore": rng.normal(0, 2, 2), "aesthetic": rng.normal(5, 0.5, 2)} for r in recs}
    scores[recs[0].pair_id] = {"clipscore": np.array([1.0, 1.0]), "aesthetic": np.array([5.0, 5.0])}  # a tie
    del scores[recs[1].pair_id]                                                                     # unscored
    weights = {"clip": {"clipscore": 1.0}, "aes": {"aesthetic": 1.0}, "mix": {"clipscore": 0.3, "aesthetic": 0.7}}
    users = SyntheticUsers(weights, standardisation(scores, ["aesthetic", "clipscore"]))
    out, counts = relabel(recs, scores, users, seed=4)
    assert counts["ties"] == 1 and counts["unscored"] == 1 and counts["kept"] == len(recs) - 2
    stats = users.stats
    for r, u, flipped in out:
        assert u == assign_user(r.pair_id, sorted(weights), 4)
        z = {k: (scores[r.pair_id][k] - stats[k][0]) / stats[k][1] for k in stats}
        own = sum(w * z[k] for k, w in weights[u].items())
        # Independent formula: the user's reward of the original loser beats the winner's.
        assert flipped == bool(own[1] > own[0])
    assert 0 < counts["flipped"] < counts["kept"]
    assert sum(v["flipped"] for v in counts["per_user"].values()) == counts["flipped"]


def test_relabelled_folder_loads_with_the_users_labels(pairs, tmp_path):
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.embed.store import EmbeddingStore

    recs = pairs.records
    scores = {r.pair_id: {"clipscore": np.array([float(i % 3), 1.0])} for i, r in enumerate(recs)}
    users = SyntheticUsers({"a": {"clipscore": 1.0}, "b": {"clipscore": -1.0}},
                           standardisation(scores, ["clipscore"]))
    labelled, counts = relabel(recs, scores, users)
    write_relabelled(labelled, tmp_path / "syn", rows_per_file=4)
    back = load_pairs(str(tmp_path / "syn"), min_pairs_per_user=1, decode_images=False, progress=False)
    got = {(r.uid_w, r.uid_l, r.user_id) for r in back.records}
    want = {((r.uid_l, r.uid_w) if fl else (r.uid_w, r.uid_l)) + (u,) for r, u, fl in labelled}
    assert got == want and len(back.records) == counts["kept"]
    path = write_weight_store(users, tmp_path / "w.safetensors")
    st = EmbeddingStore(path)
    assert torch.equal(st.get("b"), torch.tensor([[[-1.0]]])) and st.meta("a")[0]["weights"] == {"clipscore": 1.0}


def test_user_weights_file_errors(tmp_path):
    p = tmp_path / "u.yaml"
    p.write_text("users:\n  clip: {clipscore: 1}\n  mix: {clipscore: 0.5, aesthetic: 0.5}\n")
    assert read_user_weights(p) == {"clip": {"clipscore": 1.0}, "mix": {"clipscore": 0.5, "aesthetic": 0.5}}
    p.write_text(json.dumps({"x": {"vibes": 1}}))
    with pytest.raises(ValueError, match="unknown reward"):
        read_user_weights(p)
    with pytest.raises(KeyError, match="not scored"):
        SyntheticUsers({"u": {"hpsv2": 1.0}}, {}).reward("u", {"clipscore": np.zeros(2)})


def test_own_rewards_and_spearman():
    users = SyntheticUsers({"a": {"clipscore": 2.0}}, {"clipscore": (1.0, 0.5)})
    scores = {"clipscore": {"ppd": {"a": [1.0, 2.0], "zz": [0.0, 0.0]}}}
    assert own_reward_scores(scores, users) == {"ppd": {"a": [0.0, 4.0]}}
    assert spearman([0, 0.5, 1], [1, 2, 3]) == pytest.approx(1.0)
    assert spearman([0, 0.5, 1], [3, 1, 2]) == pytest.approx(-0.5)
    assert spearman([0, 1, 2, 3], [1, 1, 2, 2]) == pytest.approx(np.corrcoef([0, 1, 2, 3], [0.5, 0.5, 2.5, 2.5])[0, 1])
    assert np.isnan(spearman([1, 1], [1, 2]))


def test_cli_score_then_relabel(tmp_path):
    from test_rewards import make_tiny_clip

    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.rewards_users import main
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    write_pickapic_fixture(str(tmp_path / "pap"))
    clip = str(make_tiny_clip(tmp_path / "clip"))
    common = ["--data", str(tmp_path / "pap"), "--scores", str(tmp_path / "scores"), "--no-progress"]
    assert main(["score", *common, "--rewards", "clipscore,pickscore", "--clip-model", clip,
                 "--pickscore-model", clip, "--device", "cpu", "--reward-batch-size", "5"]) == 0
    (tmp_path / "users.yaml").write_text("clip: {clipscore: 1}\nmix: {clipscore: 0.5, pickscore: -0.5}\n")
    assert main(["relabel", *common, "--users", str(tmp_path / "users.yaml"), "--out", str(tmp_path / "syn"),
                 "--weight-store", str(tmp_path / "w.safetensors")]) == 0
    meta = json.loads((tmp_path / "syn" / "synthetic_users.json").read_text())
    n = len(load_pairs(str(tmp_path / "pap"), min_pairs_per_user=1, progress=False).records)
    assert meta["counts"]["kept"] + meta["counts"]["ties"] == n and set(meta["weights"]) == {"clip", "mix"}
    assert main(["relabel", *common, "--users", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_eval_interpolate_between_two_reward_users(tmp_path, monkeypatch, capsys):
    """`eval interpolate`: e(λ) between two weight-vector users; a sampler whose red channel follows
    the clipscore weight and green the aesthetic weight, rewards that read those channels: B's own
    reward rises with λ and A's falls (ρ = ±1), drawn and tabulated."""
    from types import SimpleNamespace

    import ppd_engine.eval.__main__ as cli
    import ppd_engine.sampling
    import ppd_engine.training
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.files import write_json_atomic
    from ppd_engine.testing.tiny_unets import tiny_unet

    users = SyntheticUsers({"A": {"aesthetic": 1.0}, "B": {"clipscore": 1.0}},
                           {"aesthetic": (0.5, 0.1), "clipscore": (0.5, 0.1)})
    write_json_atomic(tmp_path / "synthetic_users.json", users.to_json())
    store = write_weight_store(users, tmp_path / "w.safetensors")     # A = [1, 0], B = [0, 1]
    unet = tiny_unet("sd15")
    add_user_adapters(unet, user_dim=2, num_tokens=2)
    monkeypatch.setattr(ppd_engine.training, "load_run", lambda *a, **k: (None, SimpleNamespace(unet=unet)))

    def sampler(model, prompts, e, seeds, **kw):
        g = torch.Generator().manual_seed(seeds[0])
        img = torch.rand(len(prompts), 3, 8, 8, generator=g) * 0.05
        img[:, 0] += e[:, 0, 1].view(-1, 1, 1) * 0.9     # red   <- clipscore weight
        img[:, 1] += e[:, 0, 0].view(-1, 1, 1) * 0.9     # green <- aesthetic weight
        return img.clamp(0, 1)

    monkeypatch.setattr(ppd_engine.sampling, "generate", sampler)
    channel = {"clipscore": 0, "aesthetic": 1}
    monkeypatch.setattr(cli, "load_named_reward", lambda args, name: _MeanColour(channel[name]))
    out = tmp_path / "interp"
    rc = cli.main(["interpolate", "--out", str(out), "--run", "ppd=runs/ppd", "--store", store, "--between", "A", "B",
                   "--lambdas", "0,0.5,1", "--synthetic-users", str(tmp_path / "synthetic_users.json"),
                   "--rewards", "clipscore,aesthetic", "--prompts", "parti", "--limit", "2", "--device", "cpu",
                   "--no-progress"])
    assert rc == 0
    s = json.loads((out / "interpolation.json").read_text())
    assert s["spearman"]["B"] > 0.85 and s["spearman"]["A"] < -0.85
    assert s["mean_own_reward"]["B"] == sorted(s["mean_own_reward"]["B"])
    assert (out / "interpolation.png").stat().st_size > 1000 and "](interpolation.png)" in (out / "interpolation.md").read_text()
    # The λ images are not synthetic users: scoring them by own reward is refused by name.
    assert cli.main(["score", "--out", str(out), "--rewards", "clipscore,aesthetic", "--synthetic-users",
                     str(tmp_path / "synthetic_users.json"), "--device", "cpu", "--no-progress"]) == 2
    assert "are not synthetic users" in capsys.readouterr().err


def test_images_stream_in_their_own_order(pairs, tmp_path):
    """Records without bytes plus a reader that yields them in another order (as a row-group reader
    does) score and relabel the same as records that carry their bytes."""
    import dataclasses

    recs = pairs.records
    bare = [dataclasses.replace(r, image_w=b"", image_l=b"") for r in recs]
    by_id = {r.pair_id: r for r in recs}

    def reader(rs):
        return ((r, by_id[r.pair_id].image_w, by_id[r.pair_id].image_l) for r in reversed(rs))

    score_pairs(bare, {"red": _MeanColour(0)}, tmp_path / "a", images=reader, chunk=4, progress=False)
    score_pairs(recs, {"red": _MeanColour(0)}, tmp_path / "b", chunk=7, progress=False)
    a, b = read_scores(tmp_path / "a"), read_scores(tmp_path / "b")
    assert set(a) == set(b) and all(np.array_equal(a[k]["red"], b[k]["red"]) for k in a)
    users = SyntheticUsers({"u": {"clipscore": 1.0}, "v": {"clipscore": -1.0}}, {"clipscore": (100.0, 10.0)})
    labelled, _ = relabel(bare, {k: {"clipscore": v["red"]} for k, v in a.items()}, users)
    write_relabelled(labelled, tmp_path / "s1", images=reader, rows_per_file=5)
    write_relabelled(relabel(recs, {k: {"clipscore": v["red"]} for k, v in a.items()}, users)[0], tmp_path / "s2")
    from ppd_engine.data.pickapic import load_pairs

    got = [{(r.pair_id, r.user_id, bytes(r.image_w)) for r in load_pairs(str(tmp_path / s), min_pairs_per_user=1,
                                                                         decode_images=False, progress=False).records}
           for s in ("s1", "s2")]
    assert got[0] == got[1] and len(got[0]) == len(labelled)


def test_relabel_cli_streams_the_jpegs_instead_of_loading_them(tmp_path):
    """relabel over 96 MB of JPEGs (6,400 pairs) holds under 24 MB of Python memory at its peak: a
    couple of 256-pair row groups in flight (~4 MB each here). It loaded every JPEG of the split
    into the records first (~335 GB for Pick-a-Pic's train split). The folder it writes carries
    the pairs' bytes."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.rewards_users import main
    from ppd_engine.testing.pickapic_fixture import write_bulk_fixture

    write_bulk_fixture(str(tmp_path / "bulk"), total_image_bytes=96 << 20, users=1600)
    index = load_pairs(str(tmp_path / "bulk"), min_pairs_per_user=1, load_images=False, progress=False)
    recs = index.records
    (tmp_path / "scores").mkdir()
    pq.write_table(pa.table({"pair_id": [r.pair_id for r in recs], "user_id": [r.user_id for r in recs],
                             "uid_w": [r.uid_w for r in recs], "uid_l": [r.uid_l for r in recs],
                             "clipscore_w": [float(i % 5) for i in range(len(recs))],
                             "clipscore_l": [2.0] * len(recs)}), tmp_path / "scores" / "part-000-000000000.parquet")
    (tmp_path / "users.yaml").write_text("up: {clipscore: 1}\ndown: {clipscore: -1}\n")
    tracemalloc.start()
    try:
        assert main(["relabel", "--data", str(tmp_path / "bulk"), "--scores", str(tmp_path / "scores"),
                     "--users", str(tmp_path / "users.yaml"), "--out", str(tmp_path / "syn"), "--no-progress"]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, peak
    back = load_pairs(str(tmp_path / "syn"), min_pairs_per_user=1, decode_images=False, progress=False)
    ties = sum(i % 5 == 2 for i in range(len(recs)))
    assert len(back.records) == len(recs) - ties
    assert {r.uid_w for r in back.records} | {r.uid_l for r in back.records} <= {r.uid_w for r in recs} | {r.uid_l for r in recs}
