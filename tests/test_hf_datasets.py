"""Hugging Face `datasets` input: a save_to_disk folder (Dataset or DatasetDict), a hub id (loaded by
`datasets.load_dataset`, or with streaming read in place from the hub's parquet files) and any
fsspec URL go through the same two-pass, bounded-memory path as local parquet files: the same
records and stats, images read on demand by a reader that pickles file names, not data.

No test touches the network: the hub id's `load_dataset` is given the saved folder's dataset, and
the hub's filesystem (hf://) is a local folder registered under that protocol."""

import glob
import importlib
import io
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from ppd_engine.data.columns import ColumnMap  # noqa: E402
from ppd_engine.data.pickapic import load_pairs  # noqa: E402
from ppd_engine.data.sources import DataFileError  # noqa: E402
from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture  # noqa: E402


def _parquet_table(folder):
    """The fixture's files as one table (a dataset has one schema: user ids, int64 in one file and
    strings in the other, become strings; they normalise to the same ids)."""
    tables = [pq.read_table(p) for p in sorted(glob.glob(os.path.join(folder, "data", "*.parquet")))]
    return pa.concat_tables(t.set_column(t.schema.get_field_index("user_id"), "user_id",
                                         t.column("user_id").cast(pa.string())) for t in tables)


def _save(dataset, out, monkeypatch, batch_rows=4, shards=3):
    """save_to_disk in `shards` arrow files of `batch_rows`-row record batches (so reads cross both)."""
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", batch_rows)
    dataset.save_to_disk(str(out), num_shards=shards) if isinstance(dataset, datasets.Dataset) else \
        dataset.save_to_disk(str(out), num_shards={k: shards for k in dataset})
    return str(out)


def _view(pairs):
    return [(r.pair_id, r.caption, r.user_id, r.image_w, r.image_l) for r in pairs.records]


@pytest.fixture(scope="module")
def pic(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pickapic"))
    write_pickapic_fixture(folder, user_id_types=("int64", "string"))
    return folder


def test_a_save_to_disk_folder_gives_the_parquet_files_records_and_stats(pic, tmp_path, monkeypatch):
    saved = _save(datasets.Dataset(_parquet_table(pic)), tmp_path / "ds", monkeypatch)
    assert len(glob.glob(os.path.join(saved, "*.arrow"))) == 3
    want = load_pairs(pic, decode_images=False, progress=False)
    got = load_pairs(saved, decode_images=False, progress=False, batch_rows=5)
    # pair ids carry the ranking and image uids, so the same pairs in the same order; corrupt
    # JPEGs are found and counted the same way.
    assert _view(got) == _view(want) and len(want.records) == 15
    assert {k: v for k, v in got.stats.items() if k != "files"} == {k: v for k, v in want.stats.items() if k != "files"}
    assert got.sources == sorted(glob.glob(os.path.join(saved, "*.arrow")))
    # The index holds locations; a pickled reader (what a DataLoader worker gets) reads the bytes of
    # records spread over every file and record batch.
    index = load_pairs(saved, progress=False, load_images=False, min_pairs_per_user=1)
    reader = pickle.loads(pickle.dumps(index.image_reader()))
    units = reader.row_groups(index.records)
    assert {si for si, _, _ in units} == {0, 1, 2} and len(units) > 3
    clean = load_pairs(pic, progress=False, load_images=False, min_pairs_per_user=1)
    assert [(r.pair_id, w, lo) for r, w, lo in reader.iter_pairs(index.records)] == \
        [(r.pair_id, w, lo) for r, w, lo in clean.image_reader().iter_pairs(clean.records)]


def test_the_reader_pickles_file_names_not_data_and_the_index_maps_instead_of_copying(tmp_path, monkeypatch):
    """32 MB of image bytes: neither the pickled reader nor the open files hold them (the old
    `datasets` path pickled the whole table into every DataLoader worker)."""
    rng = np.random.default_rng(0)
    blob = [rng.bytes(1 << 20) for _ in range(32)]      # not JPEGs: load_images=False never reads them
    n = 32
    table = pa.table({"caption": [f"c{i}" for i in range(n)], "label_0": [1.0] * n, "label_1": [0.0] * n,
                      "user_id": [i % 4 for i in range(n)], "are_different": [True] * n, "has_label": [True] * n,
                      "image_0_uid": [f"a{i}" for i in range(n)], "image_1_uid": [f"b{i}" for i in range(n)],
                      "ranking_id": list(range(n)), "best_image_uid": [f"a{i}" for i in range(n)],
                      "jpg_0": blob, "jpg_1": blob[::-1]})
    saved = _save(datasets.Dataset(table), tmp_path / "big", monkeypatch, batch_rows=8, shards=2)
    del table
    pairs = load_pairs(saved, progress=False, load_images=False)
    assert len(pairs.records) == 32
    assert len(pickle.dumps(pairs.image_reader())) < 4096
    # The reader keeps both arrow files open once it has read from them: mapped, so arrow holds
    # none of their 64 MB (read into arrow buffers, it would hold all of it).
    before = pa.total_allocated_bytes()
    reader = pairs.image_reader()
    got = {r.caption: (w, lo) for r, w, lo in reader.iter_pairs([pairs.records[5], pairs.records[30]])}
    assert len(reader._open) == 2 and pa.total_allocated_bytes() - before < (1 << 20)
    assert got == {"c5": (blob[5], blob[26]), "c30": (blob[30], blob[1])}


def test_a_dataset_dict_folder_reads_the_chosen_split_only(pic, tmp_path, monkeypatch):
    table = _parquet_table(pic)
    val = table.slice(0, 12)
    dd = datasets.DatasetDict({"train": datasets.Dataset(table), "validation": datasets.Dataset(val)})
    saved = _save(dd, tmp_path / "dd", monkeypatch, shards=2)
    train = load_pairs(saved, split="train", decode_images=False, progress=False, min_pairs_per_user=1)
    valid = load_pairs(saved, split="validation", decode_images=False, progress=False, min_pairs_per_user=1)
    assert train.stats["rows"] == table.num_rows and valid.stats["rows"] == 12
    assert train.stats["files_other_splits"] == 2 and all("/train/" in s for s in train.sources)
    assert {r.caption for r in valid.records} <= set(val.column("caption").to_pylist())
    with pytest.raises(ValueError, match=r"DatasetDict with the splits train, validation; data.split / --split is 'test'"):
        load_pairs(saved, split="test", progress=False)


def _png(rng, k):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8 + k % 3, 8, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_a_columns_dataset_with_image_features_loads_through_the_column_map(tmp_path, monkeypatch):
    """The common hub form: datasets.Image() columns (struct of bytes and path) and a user column."""
    rng = np.random.default_rng(2)
    n = 10
    imgs = [(_png(rng, 2 * k), _png(rng, 2 * k + 1)) for k in range(n)]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "r9.png").write_bytes(imgs[9][1])
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                  "rejected": datasets.Image(), "who": datasets.Value("int64")})
    rows = {"prompt": [f"p{k}" for k in range(n)], "chosen": [{"bytes": i[0], "path": None} for i in imgs],
            # the last row's rejected image is a path only (bytes not embedded): read from the file
            "rejected": [{"bytes": i[1], "path": None} for i in imgs[:-1]]
            + [{"bytes": None, "path": str(tmp_path / "files" / "r9.png")}],
            "who": [k % 2 for k in range(n)]}
    saved = _save(datasets.Dataset.from_dict(rows, features=features), tmp_path / "hubform", monkeypatch, shards=2)
    cmap = ColumnMap.parse({"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "user_id": "who"})
    pairs = load_pairs(saved, decode_images=False, progress=False, min_pairs_per_user=1, columns=cmap)
    assert [(r.caption, r.user_id, r.image_w, r.image_l) for r in pairs.records] == \
        [(f"p{k}", str(k % 2), imgs[k][0], imgs[k][1]) for k in range(n)]
    assert len({r.uid_w for r in pairs.records} | {r.uid_l for r in pairs.records}) == 2 * n
    # A struct of another shape is not an image: named with its file and mapping key.
    bad = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [{"x": 1}], "rejected": [{"x": 2}]})
    bad_dir = _save(bad, tmp_path / "bad", monkeypatch, shards=1)
    with pytest.raises(DataFileError, match=r"column 'chosen' \(data.columns.image_0\) has type struct"):
        load_pairs(bad_dir, progress=False, columns=ColumnMap.parse({"prompt": "prompt", "chosen": "chosen",
                                                                      "rejected": "rejected"}))


def test_a_hub_id_is_loaded_with_datasets_load_dataset(pic, tmp_path, monkeypatch):
    saved = _save(datasets.Dataset(_parquet_table(pic)), tmp_path / "ds", monkeypatch)
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.load_from_disk(saved)       # what the download leaves: arrow files in a cache

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = load_pairs("someone/pickapic_v2", split="train", decode_images=False, progress=False)
    assert calls == [("someone/pickapic_v2", "train")]
    assert _view(got) == _view(load_pairs(pic, decode_images=False, progress=False))
    with pytest.raises(FileNotFoundError, match="nor is it a hub id"):
        load_pairs(str(tmp_path / "no" / "such" / "folder"), progress=False)
    # A relative owner/name whose "owner" is a folder here is a mistyped path, never a hub lookup.
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'data/pickapic_v2' does not exist"):
        load_pairs("data/pickapic_v2", progress=False)
    assert calls == [("someone/pickapic_v2", "train")]


class _LocalHub:
    """A local folder served as the hub's filesystem (hf://...), registered with fsspec for one test."""

    def __init__(self, root, monkeypatch):
        import fsspec
        from fsspec.implementations.dirfs import DirFileSystem

        class FakeHub(DirFileSystem):
            protocol = "hf"

            def __init__(self, **_):
                super().__init__(path=str(root), fs=fsspec.filesystem("file"))

        monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "hf", FakeHub)
        FakeHub.clear_instance_cache()


def test_streaming_reads_the_hubs_parquet_files_in_place(pic, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "datasets" / "someone" / "pickapic_v2" / "data"
    repo.mkdir(parents=True)
    for p in glob.glob(os.path.join(pic, "data", "*.parquet")):
        os.link(p, repo / os.path.basename(p))
    pq.write_table(pq.read_table(p).slice(0, 4), repo / "validation-00000-of-00001-x.parquet")
    _LocalHub(tmp_path / "hub", monkeypatch)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("streaming must not download"))
    want = load_pairs(pic, decode_images=False, progress=False)
    got = load_pairs("someone/pickapic_v2", split="train", streaming=True, decode_images=False, progress=False)
    assert _view(got) == _view(want)
    assert got.stats["files_other_splits"] == 1
    assert all(s.startswith("hf://datasets/someone/pickapic_v2/data/train-") for s in got.sources)
    # The on-demand reader reopens the URLs (in a worker, after pickling) and reads the same bytes.
    index = load_pairs("hf://datasets/someone/pickapic_v2", split="train", load_images=False, progress=False)
    reader = pickle.loads(pickle.dumps(index.image_reader()))
    read = {r.pair_id: (w, lo) for r, w, lo in reader.iter_pairs(index.records)}
    assert len(read) == len(index.records) > len(want.records)      # the index keeps pairs with corrupt JPEGs
    assert all(read[r.pair_id] == (r.image_w, r.image_l) for r in want.records)
    with pytest.raises(FileNotFoundError, match=r"refs%2Fconvert%2Fparquet"):
        load_pairs("someone/elsewhere", streaming=True, progress=False)


def test_verify_cli_reads_a_datasets_folder_in_worker_processes(pic, tmp_path, monkeypatch, capsys):
    """--data takes the folder as every command's --data does; two DataLoader workers reopen the
    arrow files themselves and find the same corrupt JPEGs as in the parquet files."""
    import json

    from ppd_engine.data.verify import main

    saved = _save(datasets.Dataset(_parquet_table(pic)), tmp_path / "ds", monkeypatch)
    memos = {}
    for name, data in (("parquet", pic), ("datasets", saved)):
        memos[name] = tmp_path / f"{name}.json"
        assert main(["--data", data, "--split", "train", "--workers", "2", "--memo", str(memos[name]),
                     "--no-progress"]) == 0
    corrupt = [json.loads(m.read_text())["corrupt"] for m in memos.values()]
    assert corrupt[0] == corrupt[1] and len(corrupt[0]) >= 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--streaming" in capsys.readouterr().out


def test_without_datasets_installed_a_datasets_folder_is_a_one_line_error(pic, tmp_path, monkeypatch, capsys):
    import sys

    from ppd_engine.data.verify import main

    saved = _save(datasets.Dataset(_parquet_table(pic)), tmp_path / "ds", monkeypatch)
    monkeypatch.setitem(sys.modules, "datasets", None)          # import datasets -> ImportError
    assert main(["--data", saved, "--memo", str(tmp_path / "m.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "pip install 'ppd_engine[hub]'" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_remote_files_fingerprint_follows_its_content(pic, tmp_path, monkeypatch):
    """The verify memo's fingerprint of hf:// files changes when a file is replaced (for URLs it was
    the same whatever the files held: os.stat of a URL always failed)."""
    from ppd_engine.data.verify import files_fingerprint

    repo = tmp_path / "hub" / "datasets" / "someone" / "p" / "data"
    repo.mkdir(parents=True)
    src = sorted(glob.glob(os.path.join(pic, "data", "*.parquet")))[0]
    (repo / "train-00000-of-00001.parquet").write_bytes(open(src, "rb").read())
    _LocalHub(tmp_path / "hub", monkeypatch)
    url = ["hf://datasets/someone/p/data/train-00000-of-00001.parquet"]
    before = files_fingerprint(url)
    assert files_fingerprint(url) == before
    pq.write_table(pq.read_table(src).slice(0, 3), repo / "train-00000-of-00001.parquet")
    assert files_fingerprint(url) != before
    assert files_fingerprint(["hf://datasets/someone/p/data/gone.parquet"]) != before


def test_streaming_a_local_folder_says_it_does_not_apply(pic, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ppd_engine.data.sources"):
        pairs = load_pairs(pic, streaming=True, decode_images=False, progress=False)
    assert len(pairs.records) == 15
    assert any("applies to hub ids" in r.getMessage() and pic in r.getMessage() for r in caplog.records)
