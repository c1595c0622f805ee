"""log.report_to: trackers checked at config validation, the old log.tensorboard still read, and a
tiny training run whose TensorBoard events and offline wandb run are read back: metrics per step,
the resolved config as hyper-parameters, the sample grid as an image."""
import glob
import json
import re
import struct
from pathlib import Path

import pytest

from ppd_engine.config import ConfigError, load_config
from ppd_engine.trackers import flat_hparams, resolve_trackers


def test_report_to_is_checked_at_validation(monkeypatch):
    import ppd_engine.trackers as trackers

    assert resolve_trackers("none") == [] and resolve_trackers("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="log.report_to: 'comet' is not a tracker"):
        load_config(None, ["log.report_to=tensorboard,comet"])
    with pytest.raises(ConfigError, match="'all' and 'none' stand alone"):
        load_config(None, ["log.report_to=all,wandb"])
    monkeypatch.setattr(trackers, "_installed", lambda pkg: pkg != "tensorboard")
    # A requested tracker that is missing stops the run before it starts (it used to log nothing) ...
    with pytest.raises(ConfigError, match="log.report_to: tensorboard is requested but the tensorboard package "
                                          "is not installed"):
        load_config(None, ["log.report_to=tensorboard"])
    assert "tensorboard" not in resolve_trackers("all")
    # ... but a finished run's config is still readable where its tracker is not installed.
    assert load_config(None, ["log.report_to=tensorboard"], runnable=False).log.report_to == "tensorboard"


def test_old_log_tensorboard_key_is_still_read(tmp_path):
    assert load_config(None, ["log.tensorboard=false"]).log.report_to == "none"
    assert load_config(None, ["log.tensorboard=true"]).log.report_to == "tensorboard"
    old = tmp_path / "old.yaml"
    old.write_text("log:\n  tensorboard: false\n  progress: false\n")
    assert load_config(old).log.report_to == "none"
    both = tmp_path / "both.yaml"
    both.write_text("log:\n  tensorboard: false\n  report_to: wandb\n")
    with pytest.raises(ConfigError, match="both.yaml: log.tensorboard and log.report_to are both given"):
        load_config(both)


def test_flat_hparams():
    assert flat_hparams({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "x"}) == \
        {"a.b": 1, "a.c": "[1, 2]", "a.d": "None", "a.e": "{}", "f": "x"}


def _wandb_records(run_dir):
    """(history rows, config) of an offline wandb run, read from its .wandb file (LevelDB log
    blocks of protobuf Records after a 7-byte ':W&B' header; wandb ships no reader)."""
    (segment,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    return _wandb_records_in(segment)


def _wandb_records_in(segment, wait_s: float = 30.0):
    """(history rows, config) of one offline segment. wandb's service process writes the file on
    its own schedule, so it is read again until its exit record is there; fragments are checked
    against their CRC-32 (over type + data), and a torn one ends the read."""
    import time
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(Path(segment) / "run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        buf = open(path, "rb").read()
        assert buf[:4] == b":W&B"
        pos, cur, parsed = 7, b"", []
        while pos + 7 <= len(buf):
            if 32768 - pos % 32768 < 7:  # block trailer too short for a record header
                pos += 32768 - pos % 32768
                continue
            crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
            data = buf[pos + 7:pos + 7 + length]
            if kind == 0 or len(data) < length or zlib.crc32(bytes([kind]) + data) != crc:
                break                        # padding at the end, or a record still being written
            cur += data
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST fragment
                r = pb.Record()
                r.ParseFromString(cur)
                parsed.append(r)
                cur = b""
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history, config = [], {}
    for r in parsed:
        if r.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        elif r.WhichOneof("record_type") == "config":
            config.update({i.key: i.value_json for i in r.config.update})
    return history, config


@pytest.mark.slow
def test_training_logs_to_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ppd_engine.models import load_diffusion_model
    from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline
    from ppd_engine.testing.tiny_training import make_embeddings, make_items
    from ppd_engine.training import Trainer

    for var, sub in (("WANDB_DIR", "w"), ("WANDB_CONFIG_DIR", "wc"), ("WANDB_CACHE_DIR", "wk"), ("WANDB_DATA_DIR", "wd")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = load_diffusion_model("sd15", make_tiny_pipeline("sd15", str(tmp_path / "pipe")))
    cfg = load_config(None, ["train.pairs_per_step=2", "train.micro_batch=2", "train.mixed_precision=fp32",
                             "optim.name=adamw", "optim.lr=3e-4", "log.report_to=tensorboard,wandb", "log.progress=false",
                             "train.max_steps=2", "log.sample_every=2", "log.sample_steps=1", "log.sample_users=1",
                             "log.sample_prompts=[a cat]", "checkpoint.every=0", "log.project=ppd-test"])
    run = tmp_path / "run"
    Trainer(cfg, model, make_items(model, 4), make_embeddings(), str(run)).fit()

    tb = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    loss = tb.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2] and loss[0].value == pytest.approx(0.6931, abs=1e-3)
    assert [e.value for e in tb.Scalars("train/lr")] == pytest.approx([3e-4, 3e-4])
    (img,) = tb.Images("samples")
    assert img.step == 2 and (img.width, img.height) == (36, 104)  # 1 prompt x (base + 1 user + zero row), 2 px padding
    start = tb.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # TensorBoard's HParams tab
    assert b"optim.lr" in start and b"log.report_to" in start
    assert "optim.lr: 0.0003" in tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    history, config = _wandb_records(run)
    assert [h["_step"] for h in history] == ["1", "2"]
    assert float(history[0]["train/loss"]) == pytest.approx(0.6931, abs=1e-3)
    assert history[1]["samples/_type"] == '"image-file"' and history[1]["samples/width"] == "36"
    assert float(config["optim.lr"]) == 3e-4 and config["log.report_to"] == '"tensorboard,wandb"'


def test_log_records_go_through_tqdm_while_the_bar_shows(tmp_path):
    """A console log handler would print through the progress bar's line; while the bar shows,
    records are written with tqdm.write instead, and the handler is back afterwards."""
    import logging
    import sys

    from tqdm.contrib.logging import _TqdmLoggingHandler

    from ppd_engine.training.metrics import MetricsLogger

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        metrics = MetricsLogger(tmp_path, 3, 0, True, "none", progress=True)
        assert console not in root.handlers and any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
        metrics.close()
        assert console in root.handlers and not any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)
        quiet = MetricsLogger(tmp_path, 3, 0, True, "none", progress=False)
        assert console in root.handlers
        quiet.close()
    finally:
        root.removeHandler(console)


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(tmp_path, monkeypatch):
    """Killed during step 5 and resumed from the step-3 checkpoint: MLflow gets the resumed steps in
    the SAME run (one run in the experiment, with the config as its parameters), wandb writes a
    second offline segment under the same run id, starting at the resume step (it used to open a
    new run each time)."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
    from ppd_engine.training import Trainer

    for var, sub in (("WANDB_DIR", "w"), ("WANDB_CONFIG_DIR", "wc"), ("WANDB_CACHE_DIR", "wk"), ("WANDB_DATA_DIR", "wd")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 asks for this to use a plain folder
    base = ["train.pairs_per_step=4", "train.micro_batch=2", "train.max_steps=6", "train.mixed_precision=fp32",
            "optim.name=adamw", "optim.lr=1e-3", "log.report_to=wandb,mlflow", "log.progress=false",
            "checkpoint.every=3", "log.project=ppd-resume", "train.reference=online"]

    class CrashAfter(list):
        left = 4 * 4 + 1          # item reads: 4 steps of 4 pairs, then one into step 5

        def __getitem__(self, i):
            CrashAfter.left -= 1
            if CrashAfter.left < 0:
                raise KeyboardInterrupt("simulated kill")
            return super().__getitem__(i)

    run = tmp_path / "run"
    model = tiny_model("sd15")
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, base), model, CrashAfter(make_items(model, 10)), make_embeddings(du=24), str(run)).fit()
    ids = json.loads((run / "trackers.json").read_text())
    model = tiny_model("sd15")
    Trainer(load_config(None, [*base, "checkpoint.resume=latest"]), model, make_items(model, 10), make_embeddings(du=24),
            str(run)).fit()
    assert json.loads((run / "trackers.json").read_text()) == ids

    client = mlflow.tracking.MlflowClient()
    (exp,) = [e for e in client.search_experiments() if e.name == "ppd-resume"]
    (only,) = client.search_runs([exp.experiment_id])
    assert only.info.run_id == ids["mlflow"] and only.data.params["optim.lr"] == "0.001"
    assert only.data.params["checkpoint.resume"] == "" and only.data.tags["resumed.checkpoint.resume"] == "latest"
    history = client.get_metric_history(only.info.run_id, "train.loss")
    # the killed run logged 1-4; the resumed one 4-6 (step 4 again: MLflow keeps both values)
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 4, 5, 6]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert max(history, key=lambda m: (m.step, m.timestamp)).value == pytest.approx(rows[-1]["loss"])

    # offline-run-<time>-<id>, and -1 after it when both segments start in the same second
    segments = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(segments) == 2 and all(re.search(rf"-{ids['wandb']}(-\d+)?$", s) for s in segments), segments
    first, second = ([h["_step"] for h in _wandb_records_in(s)[0]] for s in segments)
    assert first == ["1", "2", "3", "4"] and second == ["4", "5", "6"]
