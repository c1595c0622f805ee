"""Evaluation: prompt sets, win-rate / table math, sweep choice, generation plumbing, CLI end to end."""

import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
import torch

from ppd_engine.eval.generate import (CheckpointSpec, generate_images, image_path, load_images,
                                      parse_checkpoints, to_pil, user_condition, user_dir)
from ppd_engine.eval.prompts import load_parti, load_pickapic_captions, load_prompt_file, load_prompts
from ppd_engine.eval.report import (category_means, markdown_report, summarize, win_rate, write_json)
from ppd_engine.eval.sweep import SweepEntry, build_entries, pick_best, sweep_report

PARTI_CATEGORIES = {"Animals": 314, "Artifacts": 287, "World Knowledge": 214, "People": 177,
                    "Outdoor Scenes": 131, "Illustrations": 124, "Vehicles": 104, "Food & Beverage": 74,
                    "Arts": 66, "Abstract": 51, "Produce & Plants": 50, "Indoor Scenes": 40}


# --- prompts ------------------------------------------------------------------------------------

def test_parti_prompts_from_package():
    ps = load_parti()
    assert ps.name == "parti" and len(ps.prompts) == 1632 and ps.skipped == 0
    counts = {}
    for p in ps.prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    assert counts == PARTI_CATEGORIES
    assert ps.prompts[0].text == "bond" and ps.prompts[0].challenge == "Basic"
    # Raw TSV: quotes are part of the prompt, not csv quoting.
    assert any(p.text.startswith('"G I G G L E" painted') for p in ps.prompts)
    assert len(load_parti(limit=7).prompts) == 7
    with pytest.raises(ValueError, match="limit"):
        load_parti(limit=0)


def test_pickapic_captions(tmp_path):
    split = tmp_path / "data"
    split.mkdir()
    # validation_unique files are preferred over other splits in the same folder.
    pq.write_table(pa.table({"caption": ["a cat", "", None, "a dog", "a cat"], "x": [1, 2, 3, 4, 5]}),
                   split / "validation_unique-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["train only"]}), split / "train-00000.parquet")
    (split / "validation_unique-00001-broken.parquet").write_bytes(b"not parquet")
    ps = load_pickapic_captions(tmp_path)
    assert ps.texts == ["a cat", "a dog"] and ps.skipped == 3  # 2 empty captions + 1 broken file
    assert not ps.has_categories
    assert load_prompts("pickapic", 1, tmp_path).texts == ["a cat"]
    with pytest.raises(ValueError, match="--pickapic-dir"):
        load_prompts("pickapic")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"prompt": ["x"]}), bad / "a.parquet")
    with pytest.raises(ValueError, match="no usable captions"):
        load_pickapic_captions(bad)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    assert load_prompt_file(txt).texts == ["one", "two"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text('Prompt\tCategory\n"quoted" thing\tA\n\tB\nplain\tC\n')
    ps = load_prompts(str(tsv))
    assert ps.texts == ['"quoted" thing', "plain"] and ps.skipped == 1
    assert [p.category for p in ps.prompts] == ["A", "C"]
    (tmp_path / "bad.tsv").write_text("Text\tCategory\nx\tA\n")
    with pytest.raises(ValueError, match="'Prompt' column"):
        load_prompt_file(tmp_path / "bad.tsv")


# --- report math --------------------------------------------------------------------------------

def test_win_rate_ties_and_errors():
    assert win_rate([3, 1, 2, 5], [1, 1, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate([1.0], [2.0]) == 0.0
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError, match="equal lengths"):
        win_rate([1], [1, 2])


def _brute_force_summary(scores, users, ckpts, cats):
    """Independent float64 numpy reference of summarize()."""
    ref = {}
    for r, by in scores.items():
        arr = {c: np.array([by[c][u] for u in users], dtype=np.float64) for c in ckpts}  # (U, N)
        ref[r] = {"mean": {c: arr[c].mean() for c in ckpts},
                  "per_user": {u: {c: arr[c][i].mean() for c in ckpts} for i, u in enumerate(users)},
                  "win": {}, "cat": {}}
        for i, a in enumerate(ckpts):
            for b in ckpts[i + 1:]:
                w = (arr[a] > arr[b]) + 0.5 * (arr[a] == arr[b])
                ref[r]["win"][f"{a}_vs_{b}"] = (w.mean(), {u: w[k].mean() for k, u in enumerate(users)})
        cats_arr = np.array(cats)
        for c in ckpts:
            ref[r]["cat"][c] = {k: arr[c][:, cats_arr == k].mean() for k in set(cats)}
    return ref


def test_summarize_against_reference():
    rng = random.Random(11)
    users, ckpts = ["u1", "u2", "u3"], ["ppd", "dpo", "base"]
    cats = [rng.choice(["Animals", "Arts", "People"]) for _ in range(7)]
    # Rounded scores make ties common, so the 0.5 rule is exercised.
    scores = {r: {c: {u: [round(rng.gauss(0, 1), 1) for _ in range(7)] for u in users} for c in ckpts}
              for r in ("pickscore", "hpsv2")}
    s = summarize(scores, users, ckpts, cats)
    ref = _brute_force_summary(scores, users, ckpts, cats)
    for r in scores:
        for c in ckpts:
            assert s[r]["mean"][c] == pytest.approx(ref[r]["mean"][c], rel=1e-12)
            for u in users:
                assert s[r]["per_user"][u][c] == pytest.approx(ref[r]["per_user"][u][c], rel=1e-12)
            assert s[r]["per_category"][c] == pytest.approx(ref[r]["cat"][c], rel=1e-12)
        assert set(s[r]["win_rates"]) == {"ppd_vs_dpo", "ppd_vs_base", "dpo_vs_base"}
        for k, (overall, per_user) in ref[r]["win"].items():
            assert s[r]["win_rates"][k]["overall"] == pytest.approx(overall)
            assert s[r]["win_rates"][k]["per_user"] == pytest.approx(per_user)
    # win(a, b) + win(b, a) == 1 for every pair of score lists.
    a, b = scores["pickscore"]["ppd"]["u1"], scores["pickscore"]["dpo"]["u1"]
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="nope"):
        summarize(scores, users, ckpts + ["nope"])
    with pytest.raises(ValueError, match="7 scores for 3 prompts"):
        category_means(scores["pickscore"]["ppd"], users, cats[:3])


def test_markdown_report_and_json(tmp_path):
    users, ckpts = ["u"], ["a", "b"]
    scores = {"pickscore": {"a": {"u": [2.0, 1.0, 3.0]}, "b": {"u": [1.0, 1.0, 4.0]}}}
    s = summarize(scores, users, ckpts, ["X", "Y", "X"])
    judge = {"a_vs_b": {"win_rate": 0.75, "kept": 4, "dropped": 1}}
    md = markdown_report(s, ckpts, judge, "T")
    assert "| pickscore | 2.0000 | 2.0000 |" in md
    assert "| pickscore | all | 0.500 [" in md        # (1 + 0.5 + 0) / 3, then its interval
    assert "| a vs b | 0.750 | 4 | 1 |" in md
    assert "| X | 2.5000 | 2.5000 |" in md and "| Y | 1.0000 | 1.0000 |" in md
    write_json(tmp_path / "r.json", {"x": float("nan"), "y": [1.5]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "y": [1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left


# --- sweep --------------------------------------------------------------------------------------

def test_sweep_picks_best_mean_reward():
    users = ["u1", "u2"]
    runs = {"b1000": "r/1", "b2500": "r/2", "b5000": "r/3"}
    # b2500 wins on the mean although b5000 has the single best user.
    scores = {"pickscore": {"b1000": {"u1": [20.0, 20.5], "u2": [19.0, 19.5]},
                            "b2500": {"u1": [21.0, 21.2], "u2": [20.8, 21.0]},
                            "b5000": {"u1": [22.5, 22.9], "u2": [18.0, 18.2]}}}
    s = summarize(scores, users, list(runs))
    entries = build_entries(s, "pickscore", runs, {"b1000": 1000.0, "b2500": 2500.0, "b5000": 5000.0})
    best = pick_best(entries)
    assert best.name == "b2500" and best.beta == 2500.0
    assert best.mean_reward == pytest.approx(21.0)
    data, md = sweep_report(entries, "pickscore", "pickapic")
    assert data["best"] == "b2500" and [r["beta"] for r in data["runs"]] == [1000.0, 2500.0, 5000.0]
    assert "| b2500 | 2500 | 21.0000 | **yes** |" in md
    nan = SweepEntry("x", "r", 1.0, math.nan, {})
    assert pick_best([nan, entries[0]]).name == "b1000"
    with pytest.raises(ValueError):
        pick_best([nan])
    with pytest.raises(KeyError, match="hpsv2"):
        build_entries(s, "hpsv2", runs, {})


def test_run_beta_reads_run_config(tmp_path):
    from ppd_engine.config import load_config, save_config
    from ppd_engine.eval.sweep import run_beta

    save_config(load_config(None, ["loss.beta=2500"]), tmp_path / "run" / "config.yaml")
    assert run_beta(str(tmp_path / "run")) == (2500.0, "official")
    save_config(load_config(None, ["loss.beta=1.5", "loss.beta_units=paper"]), tmp_path / "p" / "config.yaml")
    assert run_beta(str(tmp_path / "p")) == (1.5, "paper")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        run_beta(str(tmp_path))


# --- generation plumbing ------------------------------------------------------------------------

def test_baseline_detected_from_checkpoint_state(tmp_path):
    """The trainer records personalized in state.json; eval reads it so --no-user is optional."""
    import json

    for name, flag in (("ppd", True), ("dpo", False)):
        step = tmp_path / name / "checkpoints" / "step-3"
        step.mkdir(parents=True)
        (step / "state.json").write_text(json.dumps({"step": 3, "personalized": flag}))
    cs = parse_checkpoints([f"ppd={tmp_path / 'ppd'}", f"dpo={tmp_path / 'dpo'}"])
    assert [(c.name, c.personalized) for c in cs] == [("ppd", True), ("dpo", False)]


def test_parse_checkpoints_and_user_dirs():
    cs = parse_checkpoints(["ppd=runs/a", "runs/dpo/"], no_user=["dpo"])
    assert [(c.name, c.run_dir, c.personalized) for c in cs] == [
        ("ppd", "runs/a", True), ("dpo", "runs/dpo/", False)]
    with pytest.raises(ValueError, match="twice"):
        parse_checkpoints(["x=a", "x=b"])
    with pytest.raises(ValueError, match="unknown checkpoint"):
        parse_checkpoints(["x=a"], no_user=["y"])
    with pytest.raises(ValueError, match="must match"):
        parse_checkpoints(["a/b=c"])
    assert user_dir("12345") == "12345"
    assert user_dir("a/b") != user_dir("a_b") and "/" not in user_dir("a/b")


def test_user_condition_and_to_pil():
    e = torch.randn(3, 2, 5)
    c = user_condition(e, 1, 4)
    assert c.shape == (4, 2, 5) and torch.equal(c[2], e[1])
    assert torch.equal(user_condition(e, -1, 1)[0], e[2])
    with pytest.raises(ValueError, match="out of range"):
        user_condition(e, 3, 1)
    x = torch.rand(2, 3, 5, 7)
    ims = to_pil(x)
    assert ims[1].size == (7, 5)
    back = torch.from_numpy(np.array(ims[1])).permute(2, 0, 1).float() / 255
    assert (back - x[1]).abs().max() <= 0.5 / 255 + 1e-6


def _fake_sampler(calls):
    """Deterministic stand-in for ppd_engine.sampling.generate: colour from (seed, user embedding)."""
    def gen(model, prompts, user_embeds, seeds, **kw):
        calls.append((list(prompts), user_embeds.clone(), list(seeds), kw))
        out = []
        for s, e in zip(seeds, user_embeds):
            g = torch.Generator().manual_seed(s)
            out.append((torch.rand(3, 9, 11, generator=g) + e.sum().tanh()).clamp(0, 1))
        return torch.stack(out)
    return gen


def test_generate_images_pairs_seeds_and_resumes(tmp_path):
    prompts = ["p0", "p1", "p2"]
    embeds = {"u1": torch.randn(2, 1, 4), "u2": torch.randn(2, 1, 4)}
    calls = []
    gen = _fake_sampler(calls)
    ck = CheckpointSpec("ppd", "unused")
    counts = generate_images(None, gen, ck, prompts, ["u1", "u2"], embeds.__getitem__, str(tmp_path),
                             seed=10, batch_size=2, steps=3, guidance=2.0, progress=False)
    assert counts == {"generated": 6, "kept": 0}
    assert [c[2] for c in calls] == [[10, 11], [12], [10, 11], [12]]   # seed = SEED + index
    assert calls[0][3] == {"steps": 3, "guidance": 2.0}
    assert torch.equal(calls[2][1][0], embeds["u2"][0])
    # Resume: delete one image, only it is regenerated.
    image_path(tmp_path, "ppd", "u2", 1).unlink()
    calls.clear()
    counts = generate_images(None, gen, ck, prompts, ["u1", "u2"], embeds.__getitem__, str(tmp_path),
                             seed=10, progress=False)
    assert counts == {"generated": 1, "kept": 5} and calls[0][2] == [11]
    # A non-personalized checkpoint gets zero user embeddings with the same seeds.
    calls.clear()
    dpo = CheckpointSpec("dpo", "x", personalized=False)
    with pytest.raises(ValueError, match="zero_shape"):
        generate_images(None, gen, dpo, prompts, ["u1"], embeds.__getitem__, str(tmp_path), progress=False)
    generate_images(None, gen, dpo, prompts, ["u1"], embeds.__getitem__, str(tmp_path), seed=10,
                    zero_shape=(3, 4), progress=False)
    assert all(c[1].shape[1:] == (3, 4) and torch.count_nonzero(c[1]) == 0 for c in calls)
    assert [c[2] for c in calls] == [[10, 11, 12]]
    assert len(load_images(str(tmp_path), "dpo", "u1", range(3))) == 3
    with pytest.raises(FileNotFoundError, match="missing image"):
        load_images(str(tmp_path), "dpo", "u2", [0])


# --- pipeline and CLI ---------------------------------------------------------------------------

class _DictStore:
    def __init__(self, d):
        self.d = d

    def users(self):
        return list(self.d)

    def get(self, u):
        return self.d[u]


def test_cli_help_documents_every_option(capsys):
    from ppd_engine.eval.__main__ import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subs) == {"generate", "score", "run", "sweep", "interpolate"}
    for name, sp in subs.items():
        for action in sp._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help text"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--run" in out and "--checkpoint" in out and "--aesthetic-weights" in out and "--judge-model" in out


def test_pipeline_generate_then_cli_score(tmp_path, capsys):
    """run_generation (fake sampler/loader) -> manifest -> `python -m ppd_engine.eval score` with three
    tiny reward models -> results.json numbers equal direct scoring of the saved PNGs."""
    from test_rewards import _aesthetic_weights, make_tiny_clip

    from ppd_engine.eval.__main__ import main
    from ppd_engine.eval.evaluate import read_manifest, run_generation
    from ppd_engine.eval.rewards import PickScore

    clip = str(make_tiny_clip(tmp_path / "clip"))
    _aesthetic_weights(tmp_path / "aes.pth", 12, "pth")
    out = tmp_path / "out"
    store = _DictStore({"u1": torch.randn(2, 1, 4), "u/2": torch.randn(1, 1, 4)})
    loaded = []

    # A unet carrying real user adapters (T_in=1, Du=4) is all the generate step inspects.
    from types import SimpleNamespace

    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.testing.tiny_unets import tiny_unet

    unet = tiny_unet("sd15")
    add_user_adapters(unet, user_dim=4, num_tokens=2)

    def fake_load_run(run_dir, checkpoint="latest", device="cpu"):
        loaded.append((run_dir, device))
        return None, SimpleNamespace(unet=unet)

    with pytest.raises(ValueError, match=r"takes user embeddings \(T_in, Du\) = \(1, 4\)"):
        run_generation(parse_checkpoints(["x=r"]), load_parti(limit=1), ["w"],
                       _DictStore({"w": torch.randn(1, 2, 4)}), str(tmp_path / "bad"),
                       load_run=fake_load_run, generate_fn=_fake_sampler([]), progress=False)
    loaded.clear()

    prompt_set = load_parti(limit=5)
    ckpts = parse_checkpoints(["ppd=runs/ppd", "dpo=runs/dpo"], no_user=["dpo"])
    m = run_generation(ckpts, prompt_set, store.users(), store, str(out), seed=3, batch_size=2,
                       load_run=fake_load_run, generate_fn=_fake_sampler([]), progress=False, steps=2)
    assert loaded == [("runs/ppd", "cpu"), ("runs/dpo", "cpu")]
    assert m == read_manifest(str(out))
    assert m["seeds"] == [3, 4, 5, 6, 7] and m["checkpoints"]["dpo"]["personalized"] is False
    assert m["prompts"]["categories"] == ["Abstract"] * 5
    # OUT's images are reused only for the same setup.
    with pytest.raises(ValueError, match="other seed"):
        run_generation(ckpts[:1], prompt_set, store.users(), store, str(out), seed=4, batch_size=2,
                       load_run=fake_load_run, generate_fn=_fake_sampler([]), progress=False, steps=2)
    again = run_generation(ckpts[:1], prompt_set, store.users(), store, str(out), seed=3,
                           load_run=fake_load_run, generate_fn=_fake_sampler([]), progress=False, steps=2)
    assert again["counts"] == {"ppd": {"generated": 0, "kept": 10}}
    assert set(again["on_disk"]) == {"ppd", "dpo"}   # dpo's images are still there
    with pytest.raises(ValueError, match="checkpoint dpo"):
        run_generation(parse_checkpoints(["dpo=runs/other"]), prompt_set, store.users(), store, str(out),
                       seed=3, load_run=fake_load_run, generate_fn=_fake_sampler([]), progress=False, steps=2)
    m = run_generation(ckpts, prompt_set, store.users(), store, str(out), seed=3, load_run=fake_load_run,
                       generate_fn=_fake_sampler([]), progress=False, steps=2)

    rc = main(["score", "--out", str(out), "--rewards", "pickscore,clipscore,aesthetic",
               "--pickscore-model", clip, "--clip-model", clip, "--aesthetic-clip", clip,
               "--aesthetic-weights", str(tmp_path / "aes.pth"), "--reward-batch-size", "3",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rewards"]) == {"pickscore", "clipscore", "aesthetic"}
    direct = PickScore(clip).score(load_images(str(out), "ppd", "u/2", range(5)),
                                   prompt_set.texts, progress=False)
    assert res["scores"]["pickscore"]["ppd"]["u/2"] == pytest.approx(direct.tolist(), rel=1e-5)
    ps = res["rewards"]["pickscore"]
    assert ps["win_rates"]["ppd_vs_dpo"]["overall"] == pytest.approx(win_rate(
        res["scores"]["pickscore"]["ppd"]["u1"] + res["scores"]["pickscore"]["ppd"]["u/2"],
        res["scores"]["pickscore"]["dpo"]["u1"] + res["scores"]["pickscore"]["dpo"]["u/2"]))
    assert ps["per_category"]["ppd"]["Abstract"] == pytest.approx(ps["mean"]["ppd"])
    md = (out / "report.md").read_text()
    assert "## Mean reward per checkpoint" in md and "## aesthetic per category" in md
    assert main(["score", "--out", str(out), "--rewards", "pickscore,bogus"]) == 2
    assert "--rewards: unknown ['bogus']" in capsys.readouterr().err


def test_select_users():
    from ppd_engine.eval.evaluate import select_users

    assert select_users(["a", "b", "c"], None, 2) == ["a", "b"]
    assert select_users(["a", "b", "c"], ["c", "a"], None) == ["c", "a"]
    with pytest.raises(KeyError, match="not in the embedding store"):
        select_users(["a"], ["z"], None)
    with pytest.raises(ValueError, match="no users"):
        select_users([], None, None)


# --- VLM judge win rates ------------------------------------------------------------------------

class _Shot:
    def __init__(self, i, rng):
        self.caption, self.uid_w, self.uid_l = f"caption {i}", f"w{i}", f"l{i}"
        self.image_w = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        self.image_l = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


class _BrightnessBackend:
    """Scripted VLM: prefers the brighter query image (order-consistent), or always answers '1'
    (position-biased, so every judgement must be dropped), or answers garbage."""
    name = "scripted"

    def __init__(self, mode):
        self.mode = mode

    def answer(self, prompts, seed):
        out = []
        for p in prompts:
            one, two = (float(np.asarray(im).mean()) for im in p.images[-2:])
            pick = {"bright": 1 if one > two else 2, "first": 1, "garbage": None}[self.mode]
            out.append("nonsense" if pick is None else f"User Profile: likes light\nPrediction of user preference: {pick}")
        return out


def _write_constant_images(out, ckpt, user, values):
    from ppd_engine.files import save_image_atomic as save_png

    for i, v in enumerate(values):
        save_png(Image.new("RGB", (6, 5), (v, v, v)), image_path(out, ckpt, user, i))


def test_judge_win_rates_with_order_consistency(tmp_path):
    pytest.importorskip("jinja2")
    from ppd_engine.eval.evaluate import judge_images
    from ppd_engine.eval.judging import make_judge_fn
    from ppd_engine.judge import Judge

    rng = np.random.default_rng(0)
    users = ["u1", "u2", "nobody"]
    manifest = {"prompts": {"texts": ["p0", "p1", "p2", "p3"]}, "users": users,
                "checkpoints": {"ppd": {}, "dpo": {}}}
    # ppd brighter on 3 of 4 prompts for u1, on 1 of 4 for u2 (and u2's 4th pair is a tie in colour).
    _write_constant_images(tmp_path, "ppd", "u1", [200, 200, 200, 10])
    _write_constant_images(tmp_path, "dpo", "u1", [100, 100, 100, 100])
    _write_constant_images(tmp_path, "ppd", "u2", [200, 10, 10, 10])
    _write_constant_images(tmp_path, "dpo", "u2", [100, 100, 100, 100])
    for u in ("nobody",):
        _write_constant_images(tmp_path, "ppd", u, [1, 2, 3, 4])
        _write_constant_images(tmp_path, "dpo", u, [1, 2, 3, 4])
    shots = {u: [_Shot(i, rng) for i in range(2)] for u in ("u1", "u2")}

    fn = make_judge_fn(Judge(_BrightnessBackend("bright")), shots, batch=3)
    res = judge_images(str(tmp_path), manifest, fn, progress=False)["ppd_vs_dpo"]
    assert res["per_user"]["u1"]["win_rate"] == 0.75 and res["per_user"]["u2"]["win_rate"] == 0.25
    assert res["win_rate"] == 0.5 and res["kept"] == 8 and res["dropped"] == 0
    assert res["users_not_judged"] == ["nobody"]
    for mode in ("first", "garbage"):
        fn = make_judge_fn(Judge(_BrightnessBackend(mode)), shots)
        res = judge_images(str(tmp_path), manifest, fn, progress=False)["ppd_vs_dpo"]
        assert res["kept"] == 0 and res["dropped"] == 8 and math.isnan(res["win_rate"])


def test_user_shots_prefers_recorded_pairs():
    from ppd_engine.eval.judging import user_shots

    rng = np.random.default_rng(1)
    recs = [_Shot(i, rng) for i in range(6)]
    meta = {"shots": [{"uid_w": "w4", "uid_l": "l4"}, {"uid_w": "w1", "uid_l": "l1"}]}
    assert [s.uid_w for s in user_shots(recs, meta, recs[:2])] == ["w4", "w1"]
    gone = {"shots": [{"uid_w": "w9", "uid_l": "l9"}]}
    assert [s.uid_w for s in user_shots(recs, gone, recs[:2])] == ["w0", "w1"]
    assert user_shots(recs, None, None) is None


def test_load_judge_shots_from_pickapic_folder(tmp_path):
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.eval.judging import load_judge_shots
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    write_pickapic_fixture(str(tmp_path))
    recs = load_pairs(str(tmp_path), decode_images=False, progress=False).by_user()["101"]
    chosen = [recs[5], recs[2], recs[0], recs[3]]

    class Store:  # the EmbeddingStore surface load_judge_shots uses
        def __contains__(self, u):
            return u == "101"

        def meta(self, u):
            return [{"shots": [{"uid_w": r.uid_w, "uid_l": r.uid_l} for r in chosen]}]

    shots = load_judge_shots(str(tmp_path), ["101", "103", "999"], Store(), progress=False)
    assert set(shots) == {"101", "103"}                      # 999 has no pairs: not judged
    assert [s.uid_w for s in shots["101"]] == [r.uid_w for r in chosen]   # the recorded shots
    # ... with their own bytes, read for the evaluated users only (the index holds none)
    assert [(s.image_w, s.image_l) for s in shots["101"]] == [(r.image_w, r.image_l) for r in chosen]
    assert len(shots["103"]) == 4 and isinstance(shots["103"][0].image_w, bytes)


# --- end to end: two tiny trained checkpoints -> generate -> score -> report ---------------------

def _tiny_runs(root):
    """1-step runs on H4a's tiny SD1.5 pipeline through H4b's Trainer: PPD (personalized, β 1000 and
    2000) and the Diffusion-DPO baseline (personalized=False), plus an EmbeddingStore of the users."""
    from ppd_engine.testing.tiny_training import make_embeddings, make_items

    from ppd_engine.config import load_config
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline
    from ppd_engine.training import Trainer, build_model

    pipe = make_tiny_pipeline("sd15", str(root / "pipe"))
    emb = make_embeddings(users=2, k=2, t_in=2, du=24)
    store = EmbeddingStore(str(root / "users.safetensors"))
    store.append_many([(u, e, {"source": "test"}) for u, e in emb.items()])
    runs = {}
    # ppd2 also differs in lr: Adam's first step is ~lr * sign(grad), blind to β's scale.
    for name, personalized, beta, lr in (("ppd", True, 1000, 1e-2), ("dpo", False, 1000, 1e-2),
                                         ("ppd2", True, 2000, 3e-2)):
        run_dir = root / name
        cfg = load_config(None, ["world=pickapic", f"data.folder={root}", f"data.embeddings={store.path}",
                                 "model.family=sd15", f"model.pretrained={pipe}", "train.max_steps=1", "train.pairs_per_step=1",
                                 "train.micro_batch=1", "optim.name=adamw", "train.mixed_precision=fp32",
                                 "checkpoint.every=0", f"log.run_dir={run_dir}", "log.tensorboard=false",
                                 "log.progress=false", "adapters.user_dim=24", "train.device=cpu",
                                 f"optim.lr={lr}", f"loss.beta={beta}"])
        model = build_model(cfg)
        Trainer(cfg, model, make_items(model, 2, users=2), emb if personalized else None, str(run_dir),
                personalized=personalized).fit()
        runs[name] = str(run_dir)
    return runs, store.path


@pytest.mark.slow
def test_eval_end_to_end_on_tiny_checkpoints(tmp_path):
    pytest.importorskip("ppd_engine.sampling", reason="needs H5's ppd_engine.sampling.generate")
    from test_rewards import make_tiny_clip

    from ppd_engine.eval.__main__ import main

    runs, store = _tiny_runs(tmp_path)
    clip = str(make_tiny_clip(tmp_path / "clip"))
    out = tmp_path / "eval"
    common = ["--store", store, "--prompts", "parti", "--limit", "2", "--steps", "2", "--guidance", "3",
              "--gen-batch-size", "2", "--device", "cpu", "--no-progress", "--pickscore-model", clip,
              "--clip-model", clip]
    assert main(["run", "--out", str(out), "--run", f"ppd={runs['ppd']}",
                 "--run", f"dpo={runs['dpo']}", "--no-user", "dpo",
                 "--rewards", "pickscore,clipscore", *common]) == 0
    res = json.loads((out / "results.json").read_text())
    users = res["users"]
    assert len(users) == 2 and list(res["checkpoints"]) == ["ppd", "dpo"]
    for c in ("ppd", "dpo"):
        for u in users:
            assert len(res["scores"]["pickscore"][c][u]) == 2
            assert image_path(out, c, u, 1).is_file()
    # Same seed for a prompt across users: a personalized checkpoint still differs per user.
    a = np.asarray(Image.open(image_path(out, "ppd", users[0], 0)), dtype=np.float32)
    b = np.asarray(Image.open(image_path(out, "ppd", users[1], 0)), dtype=np.float32)
    assert np.abs(a - b).max() > 0
    assert 0.0 <= res["rewards"]["pickscore"]["win_rates"]["ppd_vs_dpo"]["overall"] <= 1.0
    assert list(res["rewards"]["pickscore"]["per_category"]["ppd"]) == ["Abstract"]  # first 2 prompts
    # β sweep over two PPD runs (β 1000 and 2000 in their configs) picks the higher mean PickScore.
    # Same folder: ppd's images are reused (resume), only ppd2 is sampled.
    ppd_png = image_path(out, "ppd", users[0], 0).stat().st_mtime_ns
    main(["sweep", "--out", str(out), "--runs", runs["ppd"], runs["ppd2"], "--reward", "pickscore", *common])
    assert image_path(out, "ppd", users[0], 0).stat().st_mtime_ns == ppd_png
    sw = json.loads((out / "sweep.json").read_text())
    means = {r["name"]: r["mean_reward"] for r in sw["runs"]}
    assert {r["beta"] for r in sw["runs"]} == {1000.0, 2000.0}
    assert sw["best"] == max(means, key=means.get) and len(set(means.values())) == 2


def test_pickapic_captions_from_a_datasets_folder(tmp_path):
    """--pickapic-dir also takes a `datasets` DatasetDict folder (or a hub id / URL): its
    validation_unique split's captions, not the other splits'."""
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"validation_unique": datasets.Dataset.from_dict({"caption": ["a cat", "", "a dog", "a cat"]}),
                               "train": datasets.Dataset.from_dict({"caption": ["train only"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    ps = load_pickapic_captions(tmp_path / "dd")
    assert ps.texts == ["a cat", "a dog"] and ps.skipped == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pickapic_captions(tmp_path / "missing" / "folder")
