"""`ppd sample` at pipeline parity, on a tiny SD1.5 run: --negative-prompt, --height/--width, any
diffusers --scheduler, guidance/steps defaulting to what the run used, --checkpoint step-N inside
the run, and the contact sheet through torchvision's make_grid."""
import json

import pytest
import torch
from PIL import Image

from ppd_engine.sample import contact_sheet, main
from ppd_engine.testing.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("s") / "run", "sd15", step=3,
                         overrides=("log.sample_guidance=3.5", "log.sample_steps=2"))


def _sample(run, out, *extra):
    rc = main(["--run", str(run), "--user", "alice", "--prompt", "a red cat", "--n", "2", "--out", str(out),
               "--no-progress", *extra])
    assert rc == 0
    pixels = [torch.tensor(list(Image.open(out / f"{i}.png").getdata())) for i in range(2)]
    return json.loads((out / "sample.json").read_text()), torch.stack(pixels).float()


def test_defaults_come_from_the_run_and_flags_change_the_images(run, tmp_path):
    rec, plain = _sample(run, tmp_path / "a")
    assert (rec["guidance"], rec["steps"], rec["user_guidance"]) == (3.5, 2, 0.0)  # log.sample_* of the run
    assert (rec["height"], rec["width"], rec["scheduler"], rec["negative_prompt"]) == (32, 32, "ddim", "")
    rec, same = _sample(run, tmp_path / "b", "--checkpoint", "step-3")
    assert rec["checkpoint"] == "step-3" and torch.equal(same, plain)
    _, neg = _sample(run, tmp_path / "c", "--negative-prompt", "a dog")
    assert (neg - plain).abs().max() > 0
    rec, euler = _sample(run, tmp_path / "d", "--scheduler", "EulerDiscreteScheduler", "--steps", "3")
    assert rec["scheduler"] == "EulerDiscreteScheduler" and rec["steps"] == 3 and (euler - plain).abs().max() > 0
    rec, _ = _sample(run, tmp_path / "e", "--height", "16", "--width", "48")
    assert (rec["height"], rec["width"]) == (16, 48) and Image.open(tmp_path / "e" / "0.png").size == (48, 16)


def test_bad_flags_are_one_line_errors(run, tmp_path, capsys):
    base = ["--run", str(run), "--user", "alice", "--prompt", "x", "--out", str(tmp_path), "--no-progress"]
    assert main([*base, "--checkpoint", "step-9"]) == 2
    assert "--checkpoint step-9: no such checkpoint in" in capsys.readouterr().err
    assert main([*base, "--scheduler", "euler"]) == 2
    err = capsys.readouterr().err
    assert "scheduler 'euler'" in err and "did you mean" in err and "EulerDiscreteScheduler" in err
    assert main([*base, "--height", "18"]) == 2
    assert "height=18 must be a positive multiple of 4" in capsys.readouterr().err


def test_sampling_defaults_of_a_toy_run():
    import ppd_engine.worlds  # noqa: F401
    from ppd_engine.config import load_config
    from ppd_engine.training.run import sampling_defaults

    cfg = load_config(None, ["world=toy", "toy.user_guidance=1.5"], runnable=False)
    assert sampling_defaults(cfg) == {"guidance": cfg.toy.guidance, "user_guidance": 1.5,
                                      "steps": cfg.toy.sample_steps}


def test_contact_sheet_layout():
    images = torch.rand(5, 3, 4, 6)
    sheet = contact_sheet(images, min_side=12, pad=2)  # zoom 2, 3 columns, 2 rows
    assert sheet.shape == (3, 2 * (8 + 2) + 2, 3 * (12 + 2) + 2)
    torch.testing.assert_close(sheet[:, 2:10, 2:14], images[0].repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.all(sheet[:, :2] == 1) and torch.all(sheet[:, 12:, 30:] == 1)  # padding and the empty 6th tile
