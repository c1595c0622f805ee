"""Training on tiny SD1.5- and SDXL-style pipelines: a few steps, the loss plumbing, NaN skipping."""
from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch

from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model


@functools.lru_cache(maxsize=None)
def tiny_pipeline_dir(family: str) -> str:
    """A tiny random diffusers pipeline saved once per test session (H4a's make_tiny_pipeline)."""
    import atexit
    import shutil

    from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline

    root = tempfile.mkdtemp(prefix="ppd-tiny-")
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_pipeline(family, os.path.join(root, family))


# ------------------------------------------------------------------------------------------------
# tests

FAST = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.min_8bit_size=256", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


def _rows(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_few_steps_on_tiny_pipelines(family, tmp_path):
    """Real loader (save_pretrained -> load_diffusion_model), real text encoders, tiny UNets."""
    from ppd_engine.config import load_config
    from ppd_engine.models import load_diffusion_model
    from ppd_engine.training import Trainer
    from safetensors.torch import load_file

    model = load_diffusion_model(family, tiny_pipeline_dir(family))
    items = make_items(model, 8)
    cfg = load_config(None, [*FAST, "train.max_steps=3", "log.tensorboard=true", "log.sample_every=3",
                             "log.sample_steps=2", "log.sample_users=2", "log.sample_prompts=[a red cat, a dog]"])
    result = Trainer(cfg, model, items, make_embeddings(), str(tmp_path)).fit()
    rows = _rows(tmp_path)
    assert result.steps == 3 and [r["step"] for r in rows] == [1, 2, 3]
    # At initialisation the policy is the reference: inside = 0 exactly, so loss = log 2, acc = 1/2.
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7) and rows[0]["implicit_acc"] == 0.5
    assert rows[0]["model_mse"] == rows[0]["ref_mse"]
    for r in rows:
        for key in ("loss", "implicit_acc", "model_mse", "ref_mse", "reward_margin", "grad_norm", "lr",
                    "pairs_per_s", "peak_mem_mb"):
            assert isinstance(r[key], float) and r[key] == r[key], key
        assert r["skipped"] == 0
    assert rows[-1]["model_mse"] != rows[-1]["ref_mse"]  # the policy moved away from the reference
    saved = load_file(os.path.join(result.last_checkpoint, "adapters.safetensors"))
    assert max(v.abs().max().item() for k, v in saved.items() if "to_v_ip" in k) > 0  # started at zero
    assert os.path.isfile(tmp_path / "config.yaml") and any((tmp_path / "tb").iterdir())
    from PIL import Image

    # Sample grid: rows = the base model + 2 users + the zero embedding, columns = 2 prompts, 32 px
    # images, 2 px gaps.
    with Image.open(tmp_path / "samples" / "step-3.png") as im:
        assert im.size == (2 * 34 + 2, 4 * 34 + 2)


def test_step_shares_t_and_noise_and_applies_dropouts(monkeypatch):
    """Inspect what the step feeds the paired forward: same t and noise for winner and loser, empty
    caption and zero user embedding exactly where the draws say."""
    import ppd_engine.paired as paired
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.training.data_order import draw_pairs
    from ppd_engine.training.step import collate, micro_step_loss

    model = tiny_model("sdxl")
    add_user_adapters(model.unet, user_dim=24, in_tokens=2)
    items = make_items(model, 5, users=2)
    batch = collate(items, torch.device("cpu"))
    draws = draw_pairs(0, 0, list(range(5)), (4, 16, 16), 1000, 0.5, 0.5, torch.device("cpu"))
    draws.drop_caption = torch.tensor([True, False, True, False, False])
    embeds = torch.randn(5, 2, 24)
    seen = {}
    real = paired.paired_forward

    def spy(unet, noisy, t, text, user, **kw):
        seen.update(noisy=noisy, t=t, text=text, user=user, added=kw["added_cond_kwargs"])
        return real(unet, noisy, t, text, user, **kw)

    monkeypatch.setattr(paired, "paired_forward", spy)
    empty = model.encode_text([""])
    loss, stats = micro_step_loss(model, batch, draws, embeds, empty.states, empty.pooled, loss_name="dpo",
                                  beta=5000.0, weighting="min_snr", snr_gamma=5.0, loss_options={},
                                  strategy="sequential", autocast_dtype=None)
    assert torch.equal(seen["t"][:5], seen["t"][5:]) and torch.equal(seen["t"][:5], draws.timesteps)
    abar = model.noise_scheduler.alphas_cumprod[draws.timesteps].view(-1, 1, 1, 1)
    eps_w = (seen["noisy"][:5] - abar.sqrt() * batch["latents_w"]) / (1 - abar).sqrt()
    eps_l = (seen["noisy"][5:] - abar.sqrt() * batch["latents_l"]) / (1 - abar).sqrt()
    torch.testing.assert_close(eps_w, draws.noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_l, draws.noise, atol=1e-4, rtol=1e-4)
    for i, dropped in enumerate(draws.drop_caption.tolist()):
        want = empty.states[0] if dropped else batch["text"][i]
        assert torch.equal(seen["text"][i], want) and torch.equal(seen["text"][i + 5], want)
        want_p = empty.pooled[0] if dropped else batch["pooled"][i]
        assert torch.equal(seen["added"]["text_embeds"][i], want_p)
    assert torch.equal(seen["added"]["time_ids"][:5], batch["time_ids_w"])
    assert torch.equal(seen["user"][:5], embeds) and torch.equal(seen["user"][5:], embeds)
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at init


def test_pick_user_embeds_draws_one_of_k():
    from ppd_engine.training.step import pick_user_embeds

    emb = make_embeddings(users=2, k=3)
    out = pick_user_embeds(["user1", "user0", "user1"], torch.tensor([0.0, 0.5, 0.99], dtype=torch.float64), emb,
                           (2, 24), torch.device("cpu"))
    assert torch.equal(out[0], emb["user1"][0]) and torch.equal(out[1], emb["user0"][1])
    assert torch.equal(out[2], emb["user1"][2])
    with pytest.raises(KeyError, match="user 'nobody' has no embedding"):
        pick_user_embeds(["nobody"], torch.zeros(1), emb, (2, 24), torch.device("cpu"))
    zero = pick_user_embeds(["user0"], torch.zeros(1), emb, (2, 24), torch.device("cpu"), zero=True)
    assert zero.shape == (1, 2, 24) and not zero.any()


class _PoisonFrom(list):
    """Items whose latents turn NaN for the given dataset indices."""

    def __init__(self, items, bad: set[int]):
        super().__init__(items)
        self.bad = bad

    def __getitem__(self, i):
        it = super().__getitem__(i)
        if i in self.bad:
            it = dict(it, latents_w=torch.full_like(it["latents_w"], float("nan")))
        return it


def test_nan_step_is_skipped_without_touching_params_or_optimizer(tmp_path):
    from safetensors.torch import load_file

    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer
    from ppd_engine.training.data_order import DataOrder

    model = tiny_model("sd15")
    items = make_items(model, 8)
    cfg = load_config(None, [*FAST, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=5"])
    poison = set(DataOrder(8, 4, cfg.train.seed).step_indices(1)[:1])  # one pair of step 2
    Trainer(cfg, model, _PoisonFrom(items, poison), make_embeddings(), str(tmp_path)).fit()
    rows = _rows(tmp_path)
    assert [r["skipped"] for r in rows] == [0, 1, 0] and rows[-1]["bad_steps_total"] == 1
    assert rows[1]["loss"] is None  # NaN is written as null
    ck = tmp_path / "checkpoints"
    for name in ("adapters.safetensors", "optimizer-rank0.safetensors"):
        s1, s2, s3 = (load_file(str(ck / f"step-{i}" / name)) for i in (1, 2, 3))
        assert all(torch.equal(s1[k], s2[k]) for k in s1), name       # the bad step changed nothing
        assert any(not torch.equal(s2[k], s3[k]) for k in s2), name   # the next good step trains again


def test_too_many_bad_steps_stop_with_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from ppd_engine.config import load_config
    from ppd_engine.training import BadStepsError, Trainer

    model = tiny_model("sd15")
    items = make_items(model, 8)
    # The dataset turns bad after 4 reads (a stateful dataset): the reference runs online, or the
    # cached pre-pass would spend those reads.
    cfg = load_config(None, [*FAST, "train.max_steps=6", "checkpoint.every=1", "train.max_bad_steps=1",
                             "train.reference=online"])

    class FromStep2(list):
        reads = 0

        def __getitem__(self, i):
            FromStep2.reads += 1
            it = super().__getitem__(i)
            return it if FromStep2.reads <= 4 else dict(it, text=it["text"] * float("inf"))

    with pytest.raises(BadStepsError, match="2 consecutive steps had a NaN/Inf loss or gradient.*step-3"):
        Trainer(cfg, model, FromStep2(items), make_embeddings(), str(tmp_path)).fit()
    a1 = load_file(str(tmp_path / "checkpoints" / "step-1" / "adapters.safetensors"))
    a3 = load_file(str(tmp_path / "checkpoints" / "step-3" / "adapters.safetensors"))
    assert all(torch.equal(a1[k], a3[k]) for k in a1)


@pytest.mark.parametrize("extra", [["loss.name=kto"], ["loss.name=sft"], ["loss.name=robust"],
                                   ["loss.weighting=min_snr", "train.mixed_precision=bf16", "optim.name=adamw"],
                                   ["optim.name=adafactor", "train.paired_strategy=stacked"]])
def test_loss_and_optimizer_variants_train(extra, tmp_path):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, "train.max_steps=2", *extra])
    trainer = Trainer(cfg, model, make_items(model, 4), make_embeddings(), str(tmp_path))
    result = trainer.fit()
    assert result.steps == 2 and result.final_metrics["skipped"] == 0
    assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 masters under bf16 autocast


def test_non_personalized_baseline_uses_zero_user(tmp_path):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, "train.max_steps=1", "adapters.user_dim=24"])
    with pytest.raises(ValueError, match="needs user embeddings"):
        Trainer(cfg, tiny_model("sd15"), make_items(model, 4), None, str(tmp_path / "x"))
    result = Trainer(cfg, model, make_items(model, 4), None, str(tmp_path), personalized=False).fit()
    assert result.steps == 1


@pytest.mark.slow
def test_pickapic_world_end_to_end_through_the_cli(tmp_path):
    """Parquet fixture -> load_pairs -> few-shot split -> EmbeddingStore -> latent cache -> Trainer, via main()."""
    from ppd_engine.testing.pickapic_fixture import write_fixture_with_embeddings
    from ppd_engine.train import main

    data, store_path, _ = write_fixture_with_embeddings(str(tmp_path))
    run = tmp_path / "run"
    rc = main(["world=pickapic", f"data.folder={data}", f"data.embeddings={store_path}",
               "model.family=sd15", f"model.pretrained={tiny_pipeline_dir('sd15')}", "model.resolution=32",
               f"cache.dir={tmp_path / 'cache'}", f"log.run_dir={run}", "data.unseen_fraction=0.2", *FAST,
               "train.max_steps=2"])
    assert rc == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    assert (run / "checkpoints" / "step-2" / "adapters.safetensors").is_file()
    assert (run / "config.yaml").read_text().count("world: pickapic") == 1
