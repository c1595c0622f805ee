"""`ppd export`: IP-Adapter weights, the users file and a model card whose snippet runs as written in
stock diffusers and gives the engine's images; training warns when its adapters cannot be exported."""
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from ppd_engine.export import main
from ppd_engine.testing.tiny_runs import make_tiny_run


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_export_folder_loads_in_stock_diffusers_as_the_card_says(tmp_path, capsys):
    import ppd_engine.worlds  # noqa: F401
    from ppd_engine.config import load_config
    from ppd_engine.sampling import generate
    from ppd_engine.training import load_run
    from ppd_engine.training.run import run_user_embedding

    run = make_tiny_run(tmp_path / "run", "sd15", in_tokens=3, scale=0.7, users=("alice", "bob", "carol"))
    out = tmp_path / "export"
    assert main(["--run", str(run), "--checkpoint", "step-2", "--out", str(out), "--users", "alice,bob"]) == 0
    users = load_file(out / "users.safetensors")
    assert sorted(users) == ["alice", "bob"] and users["alice"].shape == (1, 1, 3 * 6)
    card = (out / "README.md").read_text()
    assert 'load_ip_adapter("DIR", subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)' in card
    assert "ip_adapter_image_embeds=[torch.cat([u, u])]" in card and "ip_adapter_image_embeds=[torch.cat([mix, mix])]" in card

    # The card's code, run as written (DIR = the folder): a user and a mix, in stock diffusers.
    scope: dict = {}
    exec(_snippet(card).replace("DIR", str(out)), scope)
    assert scope["image"].size == (32, 32)

    # Its pipeline, with seeds, is the engine's sampler for the user and for the mix.
    pipe, cfg = scope["pipe"], load_config(run / "config.yaml", runnable=False)
    pipe.set_progress_bar_config(disable=True)
    _, model = load_run(run)
    for who, u in (({"user": "alice"}, users["alice"]), ({"mix": [("alice", 0.7), ("bob", 0.3)]}, scope["mix"])):
        got = pipe("a cat", ip_adapter_image_embeds=[torch.cat([u, u])], guidance_scale=3.0, num_inference_steps=3,
                   output_type="pt", generator=torch.Generator().manual_seed(7)).images
        e = run_user_embedding(run, cfg, **who)
        want = generate(model, ["a cat"], e[None], [7], steps=3, guidance=3.0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_refusals_name_the_reason(tmp_path, capsys):
    run = make_tiny_run(tmp_path / "run", "sd15", overrides=("adapters.num_tokens=2",))
    assert main(["--run", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "num_tokens=4" in capsys.readouterr().err
    good = make_tiny_run(tmp_path / "good", "sd15")
    assert main(["--run", str(good), "--out", str(tmp_path / "o2"), "--users", "zed"]) == 2
    assert "zed not in" in capsys.readouterr().err
    assert main(["--run", str(good), "--out", str(tmp_path / "o3"), "--no-users"]) == 0
    assert not (tmp_path / "o3" / "users.safetensors").exists() and (tmp_path / "o3" / "README.md").is_file()


@pytest.mark.parametrize("num_tokens,warned", [(2, True), (4, False)])
def test_training_warns_at_start_when_adapters_cannot_be_exported(tmp_path, caplog, num_tokens, warned):
    from ppd_engine.config import load_config
    from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, ["train.pairs_per_step=2", "train.micro_batch=2", "train.mixed_precision=fp32",
                             "optim.name=adamw", "log.report_to=none", "log.progress=false",
                             f"adapters.num_tokens={num_tokens}"])
    with caplog.at_level(logging.WARNING, logger="ppd_engine.adapters.io"):
        Trainer(cfg, model, make_items(model, 4), make_embeddings(), str(tmp_path))
    assert any("cannot be exported" in r.getMessage() and "num_tokens=4" in r.getMessage()
               for r in caplog.records) is warned
