"""configs/toy_smoke.yaml end to end through `python -m ppd_engine.train` (the same path as the
default run), the report recomputed from the saved PNGs, and the sampling CLI on the result."""

import json
import math
from pathlib import Path

import pytest
import torch

import numpy as np

from ppd_engine.worlds.toy.report import (
    bootstrap_indices, compute_report, goal_status, interval, load_folder, outcomes, spearman, win_rate)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from ppd_engine.train import main

    saved = torch.get_num_threads()
    run = tmp_path_factory.mktemp("toy") / "run"
    try:
        rc = main(["--config", str(ROOT / "configs" / "toy_smoke.yaml"), f"log.run_dir={run}"])
    finally:
        torch.set_num_threads(saved)
    assert rc == 0
    return run


def test_smoke_run_writes_everything(smoke_run, capsys):
    run = smoke_run
    report = json.loads((run / "report.json").read_text())
    users = report["users"]
    models = report["models"]
    assert models == ["base", "dpo", "ppd", "ppd_guided", "ppd_oracle"]
    assert report["config"] == {"encoder": "generic", "user_guidance": 0.0, "guided_column": 1.0,
                                "eval_samples_per_user": 4}
    assert list(users) == ["warm_bright", "cool_dark", "vivid", "sunset"]
    assert users["sunset"]["split"] == "unseen" and users["vivid"]["split"] == "seen"
    for name in users:
        for m in models:
            assert len(list((run / "eval" / m / name).glob("*.png"))) == 4
    assert (run / "report.png").stat().st_size > 0
    assert (run / "checkpoints").is_dir() and (run / "dpo" / "checkpoints").is_dir()
    assert (run / "oracle" / "metrics.jsonl").is_file()
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    for key in ("seen", "unseen", "all", "goals", "all_goals_met"):
        assert key in report["summary"]
    for g in report["summary"]["goals"]:
        assert g["status"] in ("MET", "not significant", "MISSED") and g["ci95"][0] <= g["ci95"][1]
    assert set(report["identification"]) == {"generic", "oracle"}
    interp = report["interpolation"]["warm_bright:cool_dark"]
    assert interp["lambdas"] == [0.0, 0.5, 1.0] and len(interp["mean_reward_first"]) == 3
    assert report["summary"]["budget"]["steps"] == report["summary"]["budget"]["dpo_steps"] == 3
    # The figures and the page that links them.
    md = (run / "report.md").read_text()
    # Held-out evaluation (log.eval_every=2): steps 0 and 2 of every trained run, seen and unseen users.
    for folder in (run, run / "dpo", run / "oracle"):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        held = {r["step"]: r for r in rows if "eval/seen/loss" in r}
        assert sorted(held) == [0, 2] and all("eval/unseen/implicit_acc" in r for r in held.values())
        # Policy == reference at step 0, up to the toy attention's rounding (tests/test_heldout.py pins 0 exactly).
        assert held[0]["eval/seen/loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert abs(held[0]["eval/unseen/reward_margin"]) < 1e-12
    for fig in ("win_rates", "interpolation_warm_bright__cool_dark", "training", "heldout",
                *(f"rewards/{u}" for u in users)):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 0 and f"figures/{fig}.png" in md
    # The report is exactly what the PNGs say, intervals included.
    meta = {n: {"split": u["split"], "weights": u["weights"]} for n, u in users.items()}
    again = compute_report(run, meta, [("warm_bright", "cool_dark")], [0.0, 0.5, 1.0], models=models, resamples=200)
    for n in users:
        assert again["users"][n]["win"] == users[n]["win"]
    assert again["summary"]["seen"] == report["summary"]["seen"]
    # A split's interval resamples the shared indices once for all its users (their outcomes are
    # correlated through the shared prompts and seeds), from the per-sample rewards in the JSON.
    seen = [n for n in users if users[n]["split"] == "seen"]
    o = np.stack([outcomes(torch.tensor(users[n]["rewards"]["ppd"]), torch.tensor(users[n]["rewards"]["base"]))
                  for n in seen])
    idx = bootstrap_indices(4, 200, 0)
    assert report["summary"]["seen"]["ppd_vs_base"]["ci95"] == pytest.approx(interval(o[:, idx].mean(axis=(0, 2))))
    # Same index = same prompt and seed: base and dpo samples are shared by all users.
    a = load_folder(run / "eval" / "base" / "warm_bright")
    assert torch.equal(a, load_folder(run / "eval" / "base" / "sunset"))


def test_bootstrap_interval_matches_the_binomial_and_goals_need_the_lower_bound():
    o = np.r_[np.ones(300), np.zeros(100)]  # a win rate of 0.75 over 400 samples
    lo, hi = interval(o[bootstrap_indices(400, 4000, 1)].mean(1))
    half = 1.96 * np.sqrt(0.75 * 0.25 / 400)  # normal approximation: +-0.042
    assert lo == pytest.approx(0.75 - half, abs=0.006) and hi == pytest.approx(0.75 + half, abs=0.006)
    assert goal_status(0.80, 0.76, 0.75) == "MET"
    assert goal_status(0.80, 0.70, 0.75) == "not significant"
    assert goal_status(0.74, 0.70, 0.75) == "MISSED"


def test_win_rate_and_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.0, 2.0, 5.0, 1.0])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(b, a) == pytest.approx(1 - win_rate(a, b))
    with pytest.raises(ValueError):
        win_rate(a, b[:3])
    assert spearman([0, 0.25, 0.5, 0.75, 1], [1, 2, 3, 10, 11]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: scipy.stats.spearmanr([1,2,3,4],[1,1,2,3]) = 0.9486832980505138
    assert spearman([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(0.9486832980505138)


@pytest.mark.parametrize("who", [["--user", "sunset"], ["--mix", "warm_bright:0.7,cool_dark:0.3"], ["--embedding"]])
def test_sample_cli(smoke_run, tmp_path, who):
    from ppd_engine.sample import main

    if who == ["--embedding"]:
        from safetensors.torch import save_file

        from ppd_engine.embed.store import EmbeddingStore

        e = EmbeddingStore(str(smoke_run / "embeddings.safetensors")).get("vivid")[0]
        f = tmp_path / "me.safetensors"
        save_file({"embedding": e.contiguous()}, str(f))
        who = ["--embedding", str(f)]
    out = tmp_path / "out"
    saved = torch.get_num_threads()
    try:
        rc = main(["--run", str(smoke_run), *who, "--prompt", "a ring", "--n", "3", "--out", str(out),
                   "--steps", "2", "--seed", "5", "--user-scale", "0.8"])
    finally:
        torch.set_num_threads(saved)
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png", "2.png", "contact_sheet.png"]
    rec = json.loads((out / "sample.json").read_text())
    assert rec["seeds"] == [5, 6, 7] and rec["user_scale"] == 0.8


def test_sample_cli_errors(smoke_run, tmp_path, capsys):
    from ppd_engine.sample import main

    assert main(["--run", str(smoke_run), "--user", "nobody", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "nobody" in capsys.readouterr().err
    assert main(["--run", str(smoke_run), "--mix", "warm_bright", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert main(["--run", str(tmp_path), "--user", "sunset", "--prompt", "x", "--out", str(tmp_path)]) == 2



def test_export_of_the_toy_run_acts_identically_in_a_stock_unet(smoke_run, tmp_path, capsys):
    """The toy run's multi-token input (a learned mix over T_in > 1) is exported, not refused, and a
    stock UNet2DConditionModel with the exported IP-Adapter predicts what the run's model does.
    The smoke run's 2 user tokens are refused, naming why."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ppd_engine.adapters import get_user_adapters, user_conditioning
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.export import main
    from ppd_engine.train import main as train
    from ppd_engine.training import load_run

    assert main(["--run", str(smoke_run), "--out", str(tmp_path / "no")]) == 2
    assert "needs num_tokens=4" in capsys.readouterr().err
    toy = tmp_path / "run"
    saved = torch.get_num_threads()
    try:  # the smoke run with the toy run's 4 user tokens
        assert train(["--config", str(ROOT / "configs" / "toy_smoke.yaml"), f"log.run_dir={toy}",
                      "adapters.num_tokens=4"]) == 0
    finally:
        torch.set_num_threads(saved)
    out = tmp_path / "export"
    assert main(["--run", str(toy), "--out", str(out), "--users", "sunset"]) == 0
    assert "no stock diffusers pipeline" in (out / "README.md").read_text()
    _, model = load_run(toy)
    assert get_user_adapters(model.unet).config["in_tokens"] > 1
    stock = UNet2DConditionModel.from_config(model.unet.config)
    stock.load_state_dict({k: v for k, v in model.unet.state_dict().items()
                           if not k.startswith("ppd_user_proj") and ".processor." not in k})
    flat = load_file(out / "ip_adapter.safetensors")
    nested = {g: {k[len(g) + 1:]: v for k, v in flat.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}
    stock._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(["a ring"]).states
    e = EmbeddingStore(str(toy / "embeddings.safetensors")).get("sunset")[:1]
    with torch.no_grad(), user_conditioning(model.unet, e, 1.0, drop=False):
        want = model.unet(x, 500, encoder_hidden_states=text).sample
    with torch.no_grad():
        u = load_file(out / "users.safetensors")["sunset"]
        got = stock(x, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [u]}).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
