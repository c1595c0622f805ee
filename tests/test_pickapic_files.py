"""Pick-a-Pic files as they come from the hub or a careless disk: splits never leak, stray and broken
files are counted or named, labels and ids are checked per file, and the index holds locations only."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppd_engine.data.pickapic import DataFileError, load_pairs
from ppd_engine.testing.pickapic_fixture import write_bulk_fixture, write_hub_layout, write_pickapic_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hub"))
    return folder, write_hub_layout(folder, seed=3)


def test_train_split_reads_train_only_and_counts_stray_files(hub):
    folder, info = hub
    p = load_pairs(folder, split="train", progress=False)
    assert p.stats == info["train"]
    assert all(os.path.basename(s).startswith("train-0000") for s in p.sources) and len(p.sources) == 2
    leaked = {r.caption for r in p.records} & set().union(*info["captions"].values())
    assert not leaked
    val = load_pairs(folder, split="validation", min_pairs_per_user=1, progress=False)
    assert {r.caption for r in val.records} == info["captions"]["validation"]
    assert val.stats["files_other_splits"] == 5   # 2 train shards, the lfs pointer, test, validation_unique


def test_no_split_in_a_multi_split_folder_is_refused(hub):
    with pytest.raises(ValueError, match="split="):
        load_pairs(hub[0], progress=False)


def test_user_id_types_differ_between_files_same_users(tmp_path):
    base = load_pairs(write_and(tmp_path / "a", ("int64", "int64")), progress=False)
    for types in (("int64", "string"), ("float64", "int64")):
        mixed = load_pairs(write_and(tmp_path / "_".join(types), types), progress=False)
        assert mixed.stats == base.stats
        assert {u: [r.pair_id for r in v] for u, v in mixed.by_user().items()} == \
               {u: [r.pair_id for r in v] for u, v in base.by_user().items()}


def write_and(folder, types):
    write_pickapic_fixture(str(folder), seed=3, user_id_types=types)
    return str(folder)


def _one_file(tmp_path, table):
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t")
    write_pickapic_fixture(str(folder), seed=3)
    return pq.read_table(str(folder / "data" / "train-00000-of-00002.parquet"))


def test_nan_and_inf_labels_are_dropped_and_counted(tmp_path, table):
    ref = load_pairs(os.path.dirname(os.path.dirname(_one_file(tmp_path / "ref", table))), min_pairs_per_user=1,
                     progress=False)
    labels = table.column("label_0").to_pylist()
    bad_rows = [i for i, r in enumerate(table.to_pylist()) if r["has_label"] and r["are_different"]
                and r["label_0"] != r["label_1"] and r["label_0"] in (0.0, 1.0)][:2]
    labels[bad_rows[0]] = float("nan")
    labels[bad_rows[1]] = float("inf")
    t = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels, pa.float64()))
    p = load_pairs(os.path.dirname(os.path.dirname(_one_file(tmp_path / "bad", t))), min_pairs_per_user=1,
                   progress=False)
    assert p.stats["nonfinite_label_dropped"] == 2
    assert p.stats["kept"] == ref.stats["kept"] - 2
    dropped = {table.column("ranking_id")[i].as_py() for i in bad_rows}
    assert not {int(r.ranking_id) for r in p.records} & dropped


@pytest.mark.parametrize("column,values,type_", [
    ("label_0", lambda t: [str(v) for v in t.column("label_0").to_pylist()], pa.string()),
    ("caption", lambda t: list(range(t.num_rows)), pa.int64()),
])
def test_wrong_column_types_name_file_and_column(tmp_path, table, column, values, type_):
    t = table.set_column(table.schema.get_field_index(column), column, pa.array(values(table), type_))
    path = _one_file(tmp_path, t)
    with pytest.raises(DataFileError) as e:
        load_pairs(str(tmp_path), progress=False)
    msg = str(e.value)
    assert path in msg and repr(column) in msg and "\n" not in msg


@pytest.mark.parametrize("damage", ["empty", "html"])
def test_files_that_are_not_parquet_are_skipped_and_counted(tmp_path, table, damage, caplog):
    _one_file(tmp_path, table)
    bad = tmp_path / "data" / "train-00001-of-00002.parquet"
    bad.write_bytes(b"" if damage == "empty" else b"<html>404</html>")
    with caplog.at_level("WARNING", logger="ppd_engine.data.pickapic"):
        p = load_pairs(str(tmp_path), min_pairs_per_user=1, progress=False)
    assert p.stats["files_not_parquet"] == 1 and p.stats["files"] == 1
    assert str(bad) in caplog.text


def test_truncated_and_corrupt_parquet_give_one_line_errors_naming_the_file(tmp_path, table):
    path = _one_file(tmp_path, table)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataFileError) as e:
        load_pairs(str(tmp_path), progress=False)
    assert path in str(e.value) and "truncated" in str(e.value)
    # A corrupt page header: overwrite the bytes right after the leading magic (the first column
    # chunk's page header) while the footer stays intact.
    with open(path, "wb") as f:
        f.write(data[:4] + b"\xff" * 64 + data[68:])
    with pytest.raises(DataFileError) as e:
        load_pairs(str(tmp_path), progress=False)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_cli_error_is_one_line(tmp_path, table):
    path = _one_file(tmp_path, table)
    with open(path, "r+b") as f:
        f.truncate(100)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "ppd_engine.cache.build", "--family", "sd15", "--pretrained", "x",
                          "--data", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-progress"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and path in lines[0] and "Traceback" not in out.stderr


def test_index_only_records_locations_and_with_images_reads_them(tmp_path):
    folder = str(tmp_path)
    write_pickapic_fixture(folder, seed=3)
    full = load_pairs(folder, decode_images=False, verify_images=False, progress=False)
    index = load_pairs(folder, load_images=False, progress=False)
    assert [r.pair_id for r in index.records] == [r.pair_id for r in full.records]
    assert all(r.image_w is None and r.image_l is None for r in index.records)
    some = index.records[::3]
    filled = index.with_images(some)
    assert [r.pair_id for r in filled] == [r.pair_id for r in some]
    want = {r.pair_id: (r.image_w, r.image_l) for r in full.records}
    assert all((r.image_w, r.image_l) == want[r.pair_id] for r in filled)


_RSS_SCRIPT = """
import json, sys
from ppd_engine.data.pickapic import load_pairs
def rss(key='VmRSS'):
    # /proc's VmHWM (the peak) starts afresh at exec, unlike getrusage's ru_maxrss, which a child
    # inherits from the pytest process that forked it.
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
load_pairs(sys.argv[1], load_images=False, progress=False, min_pairs_per_user=99)  # warm imports and caches
before = rss()
p = load_pairs(sys.argv[1], load_images=False, progress=False)
print(json.dumps({"delta": rss() - before, "peak": rss('VmHWM'),
                  "before": before, "kept": p.stats["kept"]}))
"""


def test_loading_the_index_does_not_grow_with_image_bytes(tmp_path):
    written = write_bulk_fixture(str(tmp_path), total_image_bytes=320 << 20)
    assert written >= 300 << 20
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, check=True)
    m = json.loads(out.stdout)
    assert m["kept"] == 1600
    # Peak RSS over the whole process (imports included) minus the RSS after the warm-up load:
    # what reading the index of 320 MB of JPEGs costs at its worst moment.
    assert m["peak"] - m["before"] < 64 << 20, m
    assert m["delta"] < 64 << 20, m


def test_verify_pass_with_workers_is_remembered(tmp_path, monkeypatch):
    from ppd_engine.data import verify

    folder = str(tmp_path / "d")
    expected = write_pickapic_fixture(folder, seed=3)
    memo = str(tmp_path / "verified.json")
    index = load_pairs(folder, load_images=False, progress=False)
    bad = verify.find_corrupt(index, workers=2, memo=memo, progress=False)
    # The same drops as decoding while loading, from the index plus the verify pass.
    assert index.drop_corrupt(bad, 4).stats == expected
    # A second command over the same files decodes nothing.
    monkeypatch.setattr(verify, "_decode", lambda *a, **k: pytest.fail("decoded again"))
    assert verify.find_corrupt(load_pairs(folder, load_images=False, progress=False), memo=memo, progress=False) == bad
    # Another file at the same path is another answer.
    monkeypatch.undo()
    write_pickapic_fixture(folder, seed=4)
    os.utime(os.path.join(folder, "data", "train-00000-of-00002.parquet"), ns=(1, 1))
    calls = []
    real = verify._decode
    monkeypatch.setattr(verify, "_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    verify.find_corrupt(load_pairs(folder, load_images=False, progress=False), memo=memo, progress=False)
    assert calls


def test_the_index_holds_each_caption_and_user_once(tmp_path):
    """Pick-a-Pic-shaped rows (36-character image uids, users with many pairs, prompts repeated across
    pairs): the index costs < 480 B/pair (595 B when every row carried its own caption and user-id
    strings); the same user's and the same caption's records share one string."""
    import random
    import tracemalloc
    import uuid

    rng = random.Random(0)
    n = 4000
    captions = [f"a photograph of a cat in the style of an old master painting, variant {k}" for k in range(40)]
    table = pa.table({"caption": [captions[i % 40] for i in range(n)], "label_0": [1.0] * n, "label_1": [0.0] * n,
                      "user_id": [1000 + i % 20 for i in range(n)], "are_different": [True] * n,
                      "has_label": [True] * n,
                      "image_0_uid": [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)],
                      "image_1_uid": [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)],
                      "ranking_id": list(range(10**6, 10**6 + n)), "best_image_uid": [""] * n,
                      "jpg_0": [b"x"] * n, "jpg_1": [b"y"] * n})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    load_pairs(str(tmp_path), load_images=False, progress=False)      # first-use imports, not the index
    tracemalloc.start()
    try:
        pairs = load_pairs(str(tmp_path), load_images=False, progress=False)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(pairs.records) == n and held / n < 480, held / n
    a, b = pairs.records[0], pairs.records[40]
    assert a.caption == b.caption and a.caption is b.caption and a.user_id is b.user_id


def test_staging_images_copies_them_to_a_local_file_a_batch_at_a_time(tmp_path):
    """stage_images: one pass over 64 MB of JPEGs into a local arrow file, holding one batch of
    bytes at a time (< 16 MB of Python memory at its peak), and the staged pairs read back the same
    bytes, in the records' order, winner first."""
    import random
    import tracemalloc

    written = write_bulk_fixture(str(tmp_path / "bulk"), total_image_bytes=64 << 20)
    pairs = load_pairs(str(tmp_path / "bulk"), load_images=False, progress=False)
    records = list(pairs.records)
    random.Random(0).shuffle(records)                 # scattered, as embed's shots are
    tracemalloc.start()
    try:
        staged = pairs.stage_images(records, str(tmp_path / "stage" / "shots.arrow"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written >= 60 << 20 and peak < 16 << 20, peak
    assert [r.pair_id for r in staged.records] == [r.pair_id for r in records]
    sample = records[:5] + records[-5:]
    want = pairs.with_images(sample)
    got = staged.with_images(staged.records[:5] + staged.records[-5:])
    assert [(g.image_w, g.image_l) for g in got] == [(w.image_w, w.image_l) for w in want]
    with pytest.raises(ValueError, match="must end in .arrow"):
        pairs.stage_images(records[:2], str(tmp_path / "shots.bin"))


def test_with_images_opens_each_file_once_across_calls(tmp_path, monkeypatch):
    """embed and the judge call with_images once per batch / user; the pairs' one reader keeps the
    files it opened (a new reader per call reopened and re-indexed every file each time)."""
    import ppd_engine.data.pickapic as pickapic

    write_pickapic_fixture(str(tmp_path))
    pairs = load_pairs(str(tmp_path), load_images=False, progress=False, min_pairs_per_user=1)
    opened = []
    real = pickapic.open_source
    monkeypatch.setattr(pickapic, "open_source", lambda name: opened.append(name) or real(name))
    for i in range(0, len(pairs.records), 3):
        pairs.with_images(pairs.records[i:i + 3])
    assert sorted(opened) == sorted(pairs.sources) and len(pairs.sources) == 2
