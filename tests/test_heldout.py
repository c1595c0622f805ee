"""Held-out evaluation while training (training/heldout.py, log.eval_every)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model

FAST = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-2",
        "log.report_to=none", "log.progress=false", "checkpoint.every=0"]


def _sets(model):
    """Seen users' extra pairs (the trainer's embeddings) and an unseen user with its own embedding."""
    from ppd_engine.training.heldout import HeldOutSet

    unseen = [dict(it, user_id="stranger") for it in make_items(model, 3, seed=8, users=1)]
    stranger = torch.randn(1, 2, 24, generator=torch.Generator().manual_seed(3))
    return {"seen": make_items(model, 5, seed=7),  # 5: the last micro-batch is short
            "unseen": HeldOutSet(unseen, {"stranger": stranger})}


def _trainer(tmp_path, extra, eval_on=True):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, *extra])
    return Trainer(cfg, model, make_items(model, 8), make_embeddings(), str(tmp_path),
                   eval_sets=_sets(model) if eval_on else None)


def _rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_step_zero_is_ln2_repeatable_and_touches_nothing(tmp_path):
    trainer = _trainer(tmp_path, ["train.max_steps=1", "log.eval_every=1"])
    params = [p.detach().clone() for p in trainer.params]
    rng = torch.get_rng_state()
    first = trainer.heldout.evaluate()  # computes the held-out reference too
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(params, trainer.params))
    # Policy == reference at initialisation: every margin is 0, so loss = ln 2 (the loss's float32
    # rounding of it, exactly) and accuracy 1/2.
    ln2 = torch.tensor(math.log(2), dtype=torch.float32).item()
    for split in ("seen", "unseen"):
        assert first[f"eval/{split}/loss"] == ln2
        assert first[f"eval/{split}/reward_margin"] == 0.0 and first[f"eval/{split}/implicit_acc"] == 0.5
        assert first[f"eval/{split}/model_mse"] == first[f"eval/{split}/ref_mse"]
    trainer.train_step()
    after = trainer.heldout.evaluate()
    assert after["eval/seen/loss"] != first["eval/seen/loss"]  # the step moved the policy
    assert after["eval/seen/ref_mse"] == first["eval/seen/ref_mse"]  # the reference was kept
    assert trainer.heldout.evaluate() == after  # fixed draws: the same numbers at the same step
    trainer.model.unet.train()
    trainer.heldout.evaluate()
    assert trainer.model.unet.training  # evaluated in eval mode, then its mode restored


def test_eval_on_trains_bitwise_like_eval_off_and_logs_at_eval_steps(tmp_path):
    on = _trainer(tmp_path / "on", ["train.max_steps=4", "log.eval_every=2"]).fit()
    _trainer(tmp_path / "off", ["train.max_steps=4"], eval_on=False).fit()
    rows_on, rows_off = _rows(tmp_path / "on"), _rows(tmp_path / "off")
    assert [r["step"] for r in rows_on] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in rows_on[1:]] == [r["loss"] for r in rows_off]
    assert [r["grad_norm"] for r in rows_on[1:]] == [r["grad_norm"] for r in rows_off]
    keys = {f"eval/{s}/{k}" for s in ("seen", "unseen") for k in
            ("loss", "implicit_acc", "reward_margin", "rewards_chosen", "rewards_rejected", "rewards_accuracies",
             "rewards_margins")}
    for r in rows_on:
        assert keys <= set(r) if r["step"] in (0, 2, 4) else not keys & set(r), r["step"]
    assert on.final_metrics["eval/unseen/loss"] == rows_on[-1]["eval/unseen/loss"]
    assert not any(k.startswith("eval/") for r in rows_off for k in r)


def test_bad_held_out_sets_are_refused(tmp_path):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer
    from ppd_engine.training.heldout import HeldOutSet

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, "train.max_steps=1", "log.eval_every=1"])
    stranger = [dict(make_items(model, 1)[0], user_id="stranger")]
    with pytest.raises(KeyError, match=r"eval_sets\['unseen'\].*'stranger' has no embedding"):
        Trainer(cfg, model, make_items(model, 8), make_embeddings(), str(tmp_path / "a"),
                eval_sets={"unseen": HeldOutSet(stranger)})
    with pytest.raises(ValueError, match=r"eval_sets\['seen'\] has no pairs"):
        Trainer(cfg, tiny_model("sd15"), make_items(model, 8), make_embeddings(), str(tmp_path / "b"),
                eval_sets={"seen": []})


def test_held_out_numbers_reach_the_trackers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, ["train.max_steps=2", "log.eval_every=2", "log.report_to=tensorboard"]).fit()
    rows = {r["step"]: r for r in _rows(tmp_path)}
    tb = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    for key in ("eval/seen/loss", "eval/unseen/implicit_acc"):
        events = tb.Scalars(key)
        assert [e.step for e in events] == [0, 2]
        assert [e.value for e in events] == pytest.approx([rows[0][key], rows[2][key]], rel=1e-6)
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2]


def test_pickapic_world_evaluates_the_shots_of_seen_and_unseen_users(tmp_path):
    from ppd_engine.testing.pickapic_fixture import write_fixture_with_embeddings
    from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline
    from ppd_engine.train import main

    data, store_path, _ = write_fixture_with_embeddings(str(tmp_path))
    run = tmp_path / "run"
    rc = main(["world=pickapic", f"data.folder={data}", f"data.embeddings={store_path}", "model.family=sd15",
               f"model.pretrained={make_tiny_pipeline('sd15', str(tmp_path / 'pipe'))}", "model.resolution=32",
               f"cache.dir={tmp_path / 'cache'}", f"log.run_dir={run}", "data.unseen_fraction=0.2", *FAST,
               "train.max_steps=2", "log.eval_every=2"])
    assert rc == 0
    users = json.loads((run / "users.json").read_text())["users"]
    assert {u["role"] for u in users.values()} == {"seen", "unseen"}
    rows = {r["step"]: r for r in _rows(run)}
    assert sorted(rows) == [0, 1, 2]
    for step in (0, 2):
        assert {"eval/seen/loss", "eval/unseen/loss"} <= set(rows[step])
    assert rows[0]["eval/unseen/loss"] == pytest.approx(math.log(2), abs=1e-7)
